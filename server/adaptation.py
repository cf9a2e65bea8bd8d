"""Streaming NOTELA for one site: the rolling buffer, adaptation rounds and the collapse guard.

Every ``update_interval`` new embeddings the site's adapter runs a round:
teacher logits over the whole buffer, NOTELA pseudo-labels from each
window's mutual neighbours, a few student steps, and a candidate head. The
candidate is published only if its predictions on the buffer have not
collapsed against the source head's. A blocked candidate is discarded and
the trainer goes back to the last published state, so that a bad round is
not the starting point of the next.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from dawnchorus.models.head import LinearHead, sigmoid
from dawnchorus.server.buffer import NeighbourBuffer
from dawnchorus.server.priors import prior_shift

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class AdaptationConfig:
    """Streaming NOTELA settings of a base station (the same for every site it owns).

    Attributes:
        buffer_capacity: embeddings kept per site; the oldest leave first.
        update_interval: new embeddings between rounds (U).
        min_buffer: embeddings a site needs before its first round.
        k: nearest neighbours, counting the window itself (k = 5 gives 4 neighbours).
        lam: weight of the neighbours' mean in the pseudo-label (0 gives Dropout Student).
        alpha: softness of the pseudo-label; 1 keeps the teacher's scale.
        learning_rate: Adam step size of the student.
        dropout_rate: dropout on the head's input, the student's only noise.
        steps: student steps per round.
        batch_size: windows per student step.
        train_affine: also train a per-dimension scale and shift of the embedding.
        detection_threshold: score above which a window counts as positive in the guard.
        min_top_score_ratio: block a head whose mean top score on the buffer falls
            below this share of the source head's.
        min_positive_ratio: block a head whose share of positive windows falls below
            this share of the source head's (checked when the source has any).
        max_positive_ratio: block a head whose share of positive windows exceeds
            this multiple of the source head's plus 0.05 (everything detected is a
            collapse too).
        max_detection_ratio: block a head whose detections per window (every
            class at or above the threshold) exceed this multiple of the source
            head's plus 0.05. The share of positive windows cannot pass 1, so
            it misses a head that detects several classes in every window.
            NRC at ten times its tuned learning rate did that on the western
            North America benchmark domain. It reached 2 to 5 times the source
            head's detections per window, and sample-wise mAP fell by up to
            7.6 points. Its improving heads stayed at 1.5 and 2.4 times, and
            pseudo-labelling's best head at 1.6 times.
        min_confident_agreement: block a head whose top class agrees with the
            source head's on less than this share of the windows where the
            source head's top score reaches the threshold. The source head is
            right on most of those (97.6 % and 90.2 % precision at 0.5 on the
            mixed benchmark domains), so a head that changes many of them has
            scrambled its ranking. At 100 times the tuned learning rates,
            heads of offline NOTELA, Dropout Student, DUST and
            pseudo-labelling lost 35 to 80 points of sample-wise mAP. Their
            top scores and detection counts stayed near the source head's, so
            only this check blocks them. The improving heads on both mixed
            domains kept at least 0.917. The check needs at least
            ``min_confident_windows`` such windows: on fewer, one or two
            changed windows would decide it.
        min_confident_windows: see ``min_confident_agreement``.
        precision: "fp16" or "fp32" for the pushed TFLite head.
        teacher: "current" computes pseudo-labels from the student's own head, as
            NOTELA does; "source" computes them from the source head every round.
            With "current", each round lowers the targets of every class that the
            neighbours score below 0.5 by up to lambda again, so the offsets add
            up over a long stream. With "source" they cannot exceed lambda.
        prior_shift: before each round, lower each class's bias by the
            training-free prior shift estimated on the buffer
            (``server.priors.prior_shift``, source prior 1 / K, biases only
            lowered). The shift is a fixed offset of the student, so the
            student does not spend its steps learning it, and with the "source"
            teacher the pseudo-labels start from the prior-shifted source head.
    """

    buffer_capacity: int = 20_000
    update_interval: int = 256
    min_buffer: int = 64
    k: int = 5
    lam: float = 1.0
    alpha: float = 1.0
    # Learning rate, dropout and steps as tuned on the western North America
    # benchmark domain (benchmarks/hyperparameters.toml, notela-streaming).
    learning_rate: float = 1e-3
    dropout_rate: float = 0.3
    steps: int = 16
    batch_size: int = 256
    train_affine: bool = True
    detection_threshold: float = 0.5
    min_top_score_ratio: float = 0.5
    min_positive_ratio: float = 0.25
    max_positive_ratio: float = 4.0
    max_detection_ratio: float = 3.0
    min_confident_agreement: float = 0.9
    min_confident_windows: int = 50
    precision: str = "fp16"
    # On a stream ten times the length of the western North America benchmark
    # domain, the "current" teacher drifted to 9.9 points of mAP below the source
    # model while the guard passed every head. With the "source" teacher the head
    # stayed 1.4 to 2.1 points above the source on the first pass's windows.
    teacher: str = "source"
    # On the two mixed benchmark domains this variant was ahead of the source
    # model and of the prior shift alone in both mAP and cmAP.
    prior_shift: bool = True

    def __post_init__(self):
        checks = [
            (self.buffer_capacity >= 2, "buffer_capacity must be at least 2"),
            (self.update_interval >= 1, "update_interval must be at least 1"),
            (1 <= self.min_buffer <= self.buffer_capacity, "min_buffer must be 1 to buffer_capacity"),
            (self.k >= 2, "k must be at least 2 (it counts the window itself)"),
            (self.lam >= 0, "lam must be non-negative"),
            (self.alpha > 0, "alpha must be positive"),
            (0 <= self.dropout_rate < 1, "dropout_rate must be in [0, 1)"),
            (self.steps >= 0, "steps must be non-negative"),
            (self.precision in ("fp16", "fp32"), "precision must be 'fp16' or 'fp32'"),
            (self.teacher in ("current", "source"), "teacher must be 'current' or 'source'"),
        ]
        for valid, message in checks:
            if not valid:
                raise ValueError(f"invalid adaptation setting: {message} ({self})")


@dataclasses.dataclass
class GuardDecision:
    """The collapse guard's decision on a candidate head, and the numbers behind it."""

    accepted: bool
    reason: str
    stats: dict[str, float]


def check_collapse(
    source_logits: np.ndarray,
    candidate_logits: np.ndarray,
    config: AdaptationConfig,
) -> GuardDecision:
    """Compare a candidate head with the source head on the same buffer.

    Args:
        source_logits: [windows, K] the source head's logits.
        candidate_logits: [windows, K] the candidate's logits.
    """
    stats: dict[str, float] = {}
    if not np.isfinite(candidate_logits).all():
        return GuardDecision(False, "candidate logits contain NaN or infinite values", stats)

    for name, logits in (("source", source_logits), ("candidate", candidate_logits)):
        top = sigmoid(logits.max(axis=1))
        stats[f"{name}_mean_top_score"] = float(top.mean())
        stats[f"{name}_positive_rate"] = float((top >= config.detection_threshold).mean())
        detected = sigmoid(logits) >= config.detection_threshold
        stats[f"{name}_detections_per_window"] = float(detected.sum(axis=1).mean())

    source_top, candidate_top = stats["source_mean_top_score"], stats["candidate_mean_top_score"]
    source_rate, candidate_rate = stats["source_positive_rate"], stats["candidate_positive_rate"]
    if candidate_top < config.min_top_score_ratio * source_top:
        return GuardDecision(False, (
            f"mean top score fell to {candidate_top:.4f} from the source head's {source_top:.4f} "
            f"(limit {config.min_top_score_ratio:.2f}x)"), stats)
    if source_rate > 0 and candidate_rate < config.min_positive_ratio * source_rate:
        return GuardDecision(False, (
            f"positive rate fell to {candidate_rate:.4f} from the source head's {source_rate:.4f} "
            f"(limit {config.min_positive_ratio:.2f}x)"), stats)
    if candidate_rate > config.max_positive_ratio * source_rate + 0.05:
        return GuardDecision(False, (
            f"positive rate rose to {candidate_rate:.4f} from the source head's {source_rate:.4f} "
            f"(limit {config.max_positive_ratio:.1f}x + 0.05)"), stats)
    confident = sigmoid(source_logits.max(axis=1)) >= config.detection_threshold
    if confident.sum() >= max(1, config.min_confident_windows):
        agreement = float((candidate_logits[confident].argmax(axis=1) == source_logits[confident].argmax(axis=1)).mean())
        stats["confident_agreement"] = agreement
        if agreement < config.min_confident_agreement:
            return GuardDecision(False, (
                f"top class agrees with the source head's on {agreement:.3f} of the {int(confident.sum())} windows "
                f"the source head detects something in (limit {config.min_confident_agreement:.2f})"), stats)
    source_detections = stats["source_detections_per_window"]
    candidate_detections = stats["candidate_detections_per_window"]
    if candidate_detections > config.max_detection_ratio * source_detections + 0.05:
        return GuardDecision(False, (
            f"detections per window rose to {candidate_detections:.3f} from the source head's "
            f"{source_detections:.3f} (limit {config.max_detection_ratio:.1f}x + 0.05)"), stats)
    return GuardDecision(True, "ok", stats)


@dataclasses.dataclass
class RoundResult:
    """One adaptation round.

    Attributes:
        head: the candidate head, with the affine folded in.
        decision: the collapse guard's verdict on it.
        stats: pseudo-label, loss and guard statistics, and the round's timings in seconds.
        buffer_size: embeddings in the buffer.
        probe_embeddings: [n, 1024] float32, buffer windows for the manifest's probe.
    """

    head: LinearHead
    decision: GuardDecision
    stats: dict[str, float]
    buffer_size: int
    probe_embeddings: np.ndarray


class SiteAdapter:
    """Streaming NOTELA state of one site. Not thread-safe: one worker thread drives it."""

    def __init__(self, site: str, source_head: LinearHead, config: AdaptationConfig, seed: int = 0):
        # TensorFlow loads here, not at import, so that the command line can read
        # AdaptationConfig's defaults without it.
        from dawnchorus.models.notela import HeadTrainer

        self.site = site
        self.config = config
        self.source_head = source_head
        self.buffer = NeighbourBuffer(config.buffer_capacity, dim=source_head.weights.shape[1], k=config.k)
        self.trainer = HeadTrainer(source_head, learning_rate=config.learning_rate,
                                   dropout_rate=config.dropout_rate, train_affine=config.train_affine, seed=seed)
        self._accepted_state = self.trainer.get_state()
        self.pending = 0
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from the trainer state of the last published head."""
        self.trainer.set_state(state)
        self._accepted_state = self.trainer.get_state()

    def add(self, embeddings: np.ndarray) -> np.ndarray:
        """Add new embeddings [n, 1024] to the buffer and return their slots (see ``NeighbourBuffer.add``)."""
        slots = self.buffer.add(np.asarray(embeddings, dtype=np.float32))
        self.pending += len(embeddings)
        return slots

    def round_due(self, flush: bool = False) -> bool:
        """Return whether enough new embeddings arrived for a round (or any, with ``flush``)."""
        if flush:
            return self.pending > 0 and self.buffer.size >= 2
        return self.buffer.size >= self.config.min_buffer and self.pending >= self.config.update_interval

    def run_round(self, version: int) -> RoundResult:
        """Pseudo-label the buffer, train the student and check the candidate head."""
        config = self.config
        started = time.perf_counter()
        embeddings = self.buffer.embeddings
        neighbours = self.buffer.mutual_neighbours()
        neighbours_s = time.perf_counter() - started

        from dawnchorus.models.notela import notela_targets

        source_logits = self.source_head.logits(embeddings)
        reference_logits = source_logits
        shift = np.zeros(len(self.source_head.labels))
        if config.prior_shift:
            shift = prior_shift(source_logits)
            self.trainer.set_offset(shift)
            reference_logits = (source_logits + shift).astype(np.float32)
        teacher_logits = reference_logits if config.teacher == "source" else self.trainer.logits(embeddings)
        targets = notela_targets(teacher_logits, neighbours, lam=config.lam, alpha=config.alpha)
        teacher_s = time.perf_counter() - started - neighbours_s

        loss = self.trainer.fit(embeddings, targets, steps=config.steps, batch_size=config.batch_size)
        candidate = self.trainer.export_head(version)
        # The guard compares with the head the student started from: with the prior
        # shift on, that is the shifted source head. The shift alone lowers the
        # scores of a site's rare classes on purpose; only training can collapse.
        decision = check_collapse(reference_logits, candidate.logits(embeddings), config)
        total_s = time.perf_counter() - started

        has_neighbour = (neighbours >= 0).any(axis=1)
        teacher_top = teacher_logits.argmax(axis=1)
        stats = {
            "mean_pseudo_label": float(targets.mean()),
            "mean_teacher_score": float(sigmoid(teacher_logits).mean()),
            "pseudo_label_top_changed": float((targets.argmax(axis=1) != teacher_top).mean()),
            "windows_with_mutual_neighbour": float(has_neighbour.mean()),
            "mean_prior_shift": float(shift.mean()),
            "mean_mutual_neighbours": float((neighbours >= 0).sum(axis=1).mean()),
            "loss": float(loss),
            "neighbours_s": neighbours_s,
            "teacher_s": teacher_s,
            "round_s": total_s,
            **decision.stats,
        }
        self.pending = 0
        self.rounds += 1

        if decision.accepted:
            self._accepted_state = self.trainer.get_state()
        else:
            self.trainer.set_state(self._accepted_state)

        probe_rows = self._rng.choice(len(embeddings), size=min(4, len(embeddings)), replace=False)
        return RoundResult(candidate, decision, stats, len(embeddings), embeddings[np.sort(probe_rows)])
