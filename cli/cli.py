"""The ``dawnchorus`` command: demo, edge run, server run, rollback and inspect, keys generate, analyze."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import threading

from dawnchorus.systemd_notify import ServiceNotifier

_LOGGER = logging.getLogger(__name__)


def broker_address(text: str) -> tuple[str, int]:
    """Parse HOST:PORT (PORT defaults to 1883)."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid broker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    if not host or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"invalid broker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host, number


def http_address(text: str) -> tuple[str, int]:
    """Parse HOST:PORT for --http; PORT is required, and 0 picks a free port."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 <= number < 65536:
        raise argparse.ArgumentTypeError(f"invalid --http address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 "
                                         "(or 0.0.0.0:8080 to serve the whole network)")
    return host, number


def add_http_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", type=http_address, default=None, metavar="HOST:PORT",
                        help="serve the live web page and Prometheus /metrics here, e.g. 127.0.0.1:8080 "
                             "(default: off). The page has no login: use a loopback address or a trusted network")


def start_web_server(station, address: tuple[str, int]):
    """Start the live page and /metrics of ``station`` on ``address``; return the running server."""
    from dawnchorus.server.metrics import metrics_registry
    from dawnchorus.server.web import WebServer

    server = WebServer(station.live, metrics_registry(station.stats, station.live), *address)
    server.start()
    return server


PASSWORD_VARIABLE = "DAWNCHORUS_MQTT_PASSWORD"


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", type=broker_address, default="127.0.0.1:1883", metavar="HOST:PORT",
                        help="MQTT broker (default 127.0.0.1:1883)")
    parser.add_argument("--mqtt-user", default=None,
                        help=f"MQTT user name; the password is read from ${PASSWORD_VARIABLE}")
    tls = parser.add_argument_group("MQTT over TLS (see docs/deployment.md)")
    tls.add_argument("--mqtt-ca", type=pathlib.Path, default=None, metavar="FILE",
                     help="PEM certificate of the CA that signed the broker's certificate; turns TLS on. "
                          "The HOST of --broker must be a name or address in the broker's certificate")
    tls.add_argument("--mqtt-cert", type=pathlib.Path, default=None, metavar="FILE",
                     help="this client's PEM certificate, for a broker that requires one (needs --mqtt-ca)")
    tls.add_argument("--mqtt-key", type=pathlib.Path, default=None, metavar="FILE",
                     help="the unencrypted PEM private key of --mqtt-cert")


def mqtt_credentials(args: argparse.Namespace) -> tuple[str | None, str | None]:
    if args.mqtt_user is None:
        return None, None
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        raise ValueError(f"--mqtt-user {args.mqtt_user} is set but {PASSWORD_VARIABLE} is not: "
                         "export the password in that variable")
    return args.mqtt_user, password


def mqtt_tls(args: argparse.Namespace):
    """Build the TLS settings from --mqtt-ca, --mqtt-cert and --mqtt-key, or return None for plain MQTT."""
    from dawnchorus.protocol.tls import TlsSettings

    if args.mqtt_ca is None:
        if args.mqtt_cert is not None or args.mqtt_key is not None:
            raise ValueError("--mqtt-cert and --mqtt-key need --mqtt-ca, the CA certificate that signed the "
                             "broker's certificate (ca.crt next to them from deploy/make-credentials.sh)")
        return None
    return TlsSettings(args.mqtt_ca, args.mqtt_cert, args.mqtt_key)


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def sensitivity(text: str) -> float:
    value = float(text)
    if not 0.5 <= value <= 1.5:
        raise argparse.ArgumentTypeError(f"sensitivity {value} is not in [0.5, 1.5] (BirdNET's range)")
    return value


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("amqtt", "transitions", "tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of the terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


SPECIES_SPEC_HELP = ("SPEC is LAT,LON[,WEEK] (BirdNET's range model at that latitude, longitude and week "
                     "1-48, or -1 for the whole year), @FILE (exactly the labels in a file) or all; append "
                     "+@FILE to add a file's species and -@FILE to remove them")


def add_species_arguments(parser: argparse.ArgumentParser) -> None:
    from dawnchorus.models.species import (DEFAULT_RANGE_THRESHOLD, range_threshold_argument, site_species_argument,
                                           species_spec_argument)

    group = parser.add_argument_group("site species lists", SPECIES_SPEC_HELP)
    group.add_argument(
        "--site-species", type=site_species_argument, action="append", default=[], metavar="SITE=SPEC",
        help="species list of a site, e.g. forest-a=47.68,-122.29,20-@never.txt; repeat per site",
    )
    group.add_argument(
        "--default-species", type=species_spec_argument, metavar="SPEC", default="all",
        help="species list of sites not named with --site-species (default: all model classes)",
    )
    group.add_argument("--range-threshold", type=range_threshold_argument, default=DEFAULT_RANGE_THRESHOLD,
                       metavar="SCORE", help="range model occurrence threshold (default %(default)s, as BirdNET)")


def adaptation_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    group = parser.add_argument_group("streaming NOTELA")
    group.add_argument("--buffer", type=int, default=defaults.buffer_capacity,
                       help="embeddings kept per site (default %(default)s)")
    group.add_argument("--update-interval", type=int, default=defaults.update_interval,
                       help="new embeddings between adaptation rounds (default %(default)s)")
    group.add_argument("--min-buffer", type=int, default=defaults.min_buffer,
                       help="embeddings a site needs before its first round (default %(default)s)")
    group.add_argument("--steps", type=int, default=defaults.steps,
                       help="student steps per round (default %(default)s)")
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                       help="student Adam learning rate (default %(default)s)")
    group.add_argument("--precision", choices=("fp16", "fp32"), default=defaults.precision,
                       help="precision of pushed heads (default %(default)s)")
    group.add_argument("--teacher", choices=("source", "current"), default=defaults.teacher,
                       help="head that computes the pseudo-labels: the source head every round, or the "
                            "current head as in published NOTELA, which drifts on long streams "
                            "(default %(default)s)")
    group.add_argument("--prior-shift", action=argparse.BooleanOptionalAction, default=defaults.prior_shift,
                       help="lower the bias of each class that the site's windows suggest is absent, "
                            "re-estimated every round (default: %(default)s)")


def adaptation_from_args(args: argparse.Namespace):
    from dawnchorus.server.adaptation import AdaptationConfig

    return AdaptationConfig(
        buffer_capacity=args.buffer, update_interval=args.update_interval,
        min_buffer=min(args.min_buffer, args.buffer), steps=args.steps,
        learning_rate=args.learning_rate, precision=args.precision, teacher=args.teacher,
        prior_shift=args.prior_shift,
    )


def _run_until_signal(stop) -> None:
    """Block until SIGINT or SIGTERM, then call ``stop``."""
    done = threading.Event()

    def handle(signum, frame):
        _LOGGER.info("received signal %d, stopping", signum)
        done.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    while not done.wait(0.5):
        pass
    stop()


# Subcommands -------------------------------------------------------------------


def add_recorder_species_arguments(parser: argparse.ArgumentParser) -> None:
    from dawnchorus.models.species import (DEFAULT_RANGE_THRESHOLD, add_threshold_arguments, range_threshold_argument,
                                           species_spec_argument)

    group = parser.add_argument_group("species", SPECIES_SPEC_HELP)
    species = group.add_mutually_exclusive_group()
    species.add_argument("--species", type=species_spec_argument, default=None, metavar="SPEC",
                         help="the site's species list, the same as the base station's --site-species for this "
                              "site: the classes of the source head, and those every pushed head must have "
                              "(default: all model classes)")
    species.add_argument("--species-file", type=pathlib.Path, default=None, metavar="FILE",
                         help="the same as --species @FILE")
    group.add_argument("--range-threshold", type=range_threshold_argument, default=DEFAULT_RANGE_THRESHOLD,
                       metavar="SCORE", help="range model occurrence threshold (default %(default)s, as BirdNET)")
    add_threshold_arguments(group)


def recorder_species(args: argparse.Namespace, model):
    """Return the recorder's source head cut to its species list, the list itself (None for all classes)
    and its per-species thresholds by label."""
    from dawnchorus.models import birdnet
    from dawnchorus.models.species import (DEFAULT_RANGE_THRESHOLD, SpeciesListError, SpeciesSpec,
                                           load_species_thresholds)

    spec = SpeciesSpec(args.species_file) if args.species_file is not None else args.species
    head, labels = model.head, None
    if spec is not None:
        range_model = birdnet.locate_birdnet_files().range_model if args.model is None else None
        threshold = DEFAULT_RANGE_THRESHOLD if args.range_threshold is None else args.range_threshold
        try:
            labels = spec.resolve(model.head.labels, range_model, threshold)
        except SpeciesListError as error:
            raise SpeciesListError(f"--species {spec}: {error}") from error
        head = head.select(labels)
    thresholds = load_species_thresholds(args.species_thresholds)
    per_species = thresholds.resolve(model.head.labels) if thresholds is not None else {}
    unused = sorted(set(per_species) - set(head.labels))
    if unused:
        _LOGGER.info("%d species thresholds of %s are for species outside the site's list and have no effect, "
                     "e.g. %s", len(unused), thresholds.source, unused[0])
    return head, labels, per_species


def add_edge_run_arguments(parser: argparse.ArgumentParser) -> None:
    from dawnchorus.edge.recorder import RecorderConfig

    parser.add_argument("--device", required=True, help="recorder id, unique in the fleet")
    parser.add_argument("--site", required=True, help="site id; recorders of a site share one head")
    add_broker_arguments(parser)
    parser.add_argument("--input", nargs="+", type=pathlib.Path, default=[], metavar="PATH",
                        help="replay these files or folders instead of capturing from a microphone")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="replay speed for --input: 1 is real time, 0 as fast as possible (default 1)")
    parser.add_argument("--stay", action=argparse.BooleanOptionalAction, default=False,
                        help="after replaying --input, keep running to receive heads until stopped")
    parser.add_argument("--mic-device", default=None, help="sounddevice input device index or name")
    parser.add_argument("--mic-samplerate", type=int, default=48_000, help="capture sample rate in Hz")
    parser.add_argument("--mic-channels", type=int, default=1, help="channels to capture (averaged)")
    parser.add_argument("--overlap", type=float, default=0.0, help="window overlap in seconds, 0 to <3")
    parser.add_argument("--min-conf", type=probability, default=RecorderConfig.min_conf,
                        help="detection threshold (default %(default)s)")
    parser.add_argument("--sensitivity", type=sensitivity, default=1.0, help="sigmoid sensitivity 0.5-1.5")
    add_recorder_species_arguments(parser)
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path("state/edge"),
                        help="sequence numbers, reference batch and head store (default %(default)s)")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="another TFLite classifier")
    parser.add_argument("--labels", type=pathlib.Path, default=None, help="labels of --model")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads (default: cores, max 4)")
    parser.add_argument("--head-public-key", type=pathlib.Path, default=None, metavar="FILE",
                        help="the base station's public key (head-signing.pub from 'dawnchorus keys generate'); "
                             "pushed heads must be signed with its private key. Without it the recorder runs "
                             "the source head and rejects every pushed head")

    parser.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="under systemd with WatchdogSec=, stop the watchdog pings once no window was analysed "
                             "for this long, so that systemd restarts the recorder (default %(default)s)")

    parser.add_argument("--windows-per-message", type=int, default=RecorderConfig.windows_per_message,
                        metavar="N", help="embeddings per MQTT message, 1 to 256 (default %(default)s)")

    parser.add_argument("--home-assistant", nargs="?", const="homeassistant", default=None, metavar="PREFIX",
                        help="publish Home Assistant MQTT discovery configs (sensors for the last species and its "
                             "confidence, a binary sensor for online state) under PREFIX (default homeassistant), "
                             "and the retained last detection they read; off by default")
    # The negative form shares the key home_assistant in a configuration file.
    parser.add_argument("--no-home-assistant", dest="home_assistant", action="store_const", const=None,
                        help="publish no Home Assistant discovery configs, even if the configuration file sets "
                             "home_assistant")

    queue = parser.add_argument_group("store and forward")
    queue.add_argument("--queue-max-mb", type=float, default=RecorderConfig.queue_max_bytes / 2**20, metavar="MIB",
                       help="quota of the on-disk queue of messages not yet confirmed, in MiB of payload; past it "
                            "the oldest messages that wait only for the base station's receipt are deleted first, "
                            "then the oldest unsent ones, and both are counted in the status "
                            "(default %(default).0f; 0 for no limit)")
    queue.add_argument("--queue-max-entries", type=int, default=0, metavar="N",
                       help="quota of the queue in messages (default 0, no limit)")
    queue.add_argument("--reconnect-min-delay", type=float, default=RecorderConfig.reconnect_min_delay_s,
                       metavar="SECONDS", help="upper bound of the first reconnect delay (default %(default)s)")
    queue.add_argument("--reconnect-max-delay", type=float, default=RecorderConfig.reconnect_max_delay_s,
                       metavar="SECONDS", help="cap of the reconnect delay, which doubles per failed attempt and "
                                               "is drawn at random below that bound (default %(default)s)")
    queue.add_argument("--drain-timeout", type=float, default=RecorderConfig.drain_timeout_s, metavar="SECONDS",
                       help="after --input ends (without --stay), wait this long for queued messages to be "
                            "acknowledged before exiting; the rest is sent after the next start "
                            "(default %(default)s)")
    queue.add_argument("--receipts", dest="await_receipts", action=argparse.BooleanOptionalAction, default=True,
                       help="keep a queued embeddings message until the base station's receipt confirms it. "
                            "--no-receipts deletes it at the broker's acknowledgement instead; only for a recorder "
                            "whose embeddings no dawnchorus base station receives, since a broker crash can then "
                            "lose messages")
    queue.add_argument("--receipt-timeout", type=float, default=RecorderConfig.receipt_timeout_s, metavar="SECONDS",
                       help="with no receipt for this long while messages wait for one, send the oldest again as a "
                            "probe (default %(default)s)")
    queue.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                       help="add this many seconds to every timestamp the recorder sends, for a recorder whose "
                            "clock is known to be off; sequence numbers, which order the data, are not affected")


def _queue_quota_bytes(mebibytes: float) -> int | None:
    if mebibytes < 0:
        raise ValueError(f"--queue-max-mb {mebibytes} is invalid: use a size in MiB, or 0 for no limit")
    return None if mebibytes == 0 else max(1, int(mebibytes * 2**20))


def _queue_quota_entries(entries: int) -> int | None:
    if entries < 0:
        raise ValueError(f"--queue-max-entries {entries} is invalid: use a number of messages, or 0 for no limit")
    return None if entries == 0 else entries


def run_edge(args: argparse.Namespace) -> int:
    from dawnchorus.edge.audio import FileSource, MicrophoneSource
    from dawnchorus.edge.recorder import Recorder, RecorderConfig
    from dawnchorus.models.backbone import Backbone, load_source_model
    from dawnchorus.protocol.signing import load_public_key

    if not args.stall_timeout > 0:
        raise ValueError(f"--stall-timeout {args.stall_timeout} is invalid: use a number of seconds above 0")
    username, password = mqtt_credentials(args)
    tls = mqtt_tls(args)
    public_key = load_public_key(args.head_public_key) if args.head_public_key is not None else None
    model = load_source_model(args.model, args.labels)
    head, site_labels, per_species = recorder_species(args, model)
    config = RecorderConfig(
        device=args.device, site=args.site, broker_host=args.broker[0], broker_port=args.broker[1],
        username=username, password=password, tls=tls, state_dir=args.state_dir, min_conf=args.min_conf,
        sensitivity=args.sensitivity, species_thresholds=per_species,
        windows_per_message=args.windows_per_message, head_public_key=public_key,
        # The species list is the site's class list, which every pushed head must match.
        head_labels=site_labels,
        queue_max_bytes=_queue_quota_bytes(args.queue_max_mb),
        queue_max_entries=_queue_quota_entries(args.queue_max_entries),
        reconnect_min_delay_s=args.reconnect_min_delay, reconnect_max_delay_s=args.reconnect_max_delay,
        drain_timeout_s=args.drain_timeout, await_receipts=args.await_receipts,
        receipt_timeout_s=args.receipt_timeout, clock_offset_s=args.clock_offset,
        home_assistant_prefix=args.home_assistant,
    )

    if args.input:
        source = FileSource(args.input, overlap_s=args.overlap, speed=args.speed or None)
    else:
        device = int(args.mic_device) if args.mic_device and args.mic_device.isdigit() else args.mic_device
        source = MicrophoneSource(device=device, samplerate=args.mic_samplerate,
                                  channels=args.mic_channels, overlap_s=args.overlap)

    recorder = Recorder(config, Backbone(model.backbone, num_threads=args.threads), head, source)
    failures: list[BaseException] = []

    def run_recorder():
        try:
            recorder.run(stay_after_source=args.stay or not args.input)
        except Exception as error:
            _LOGGER.exception("recorder %s failed", config.device)
            failures.append(error)

    notifier = ServiceNotifier(f"recorder {config.device}", lambda: recorder.health(args.stall_timeout))
    runner = threading.Thread(target=run_recorder, name="recorder", daemon=True)
    runner.start()
    notifier.ready(f"site {config.site}, broker {config.broker_host}:{config.broker_port}")

    def stop():
        notifier.stopping()
        recorder.stop()
        if isinstance(source, MicrophoneSource):
            source.close()

    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while runner.is_alive() and not done.wait(0.5):
        pass
    stop()
    runner.join(timeout=30)
    return 1 if failures else 0


def add_server_run_arguments(parser: argparse.ArgumentParser) -> None:
    from dawnchorus.server.adaptation import AdaptationConfig

    add_broker_arguments(parser)
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path("state/server"),
                        help="head registry, acks and detection log (default %(default)s)")
    add_signing_key_argument(parser)
    parser.add_argument("--shard", default="1/1", metavar="INDEX/COUNT",
                        help="own only the sites that hash to this shard, e.g. 2/4 (default 1/1: all)")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="another TFLite classifier")
    parser.add_argument("--labels", type=pathlib.Path, default=None, help="labels of --model")
    add_http_argument(parser)
    add_species_arguments(parser)
    adaptation_arguments(parser, AdaptationConfig())


def add_signing_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--signing-key", type=pathlib.Path, default=None, metavar="FILE",
                        help="Ed25519 private key that signs every head manifest (head-signing.key from "
                             "'dawnchorus keys generate DIR'); required")


def signing_key_from_args(args: argparse.Namespace):
    """Load --signing-key, raising ValueError with the fix when it is missing or invalid."""
    from dawnchorus.protocol.signing import load_private_key

    if args.signing_key is None:
        raise ValueError("--signing-key is missing: recorders accept only signed heads. Create a key pair with "
                         "'dawnchorus keys generate DIR', pass --signing-key DIR/head-signing.key here and give "
                         "recorders --head-public-key DIR/head-signing.pub")
    return load_private_key(args.signing_key)


def species_resolver(args: argparse.Namespace, labels: list[str], range_model: pathlib.Path | None):
    """Build the function that gives each site its species list from the command line."""
    from dawnchorus.models.species import DEFAULT_RANGE_THRESHOLD, SpeciesListError

    threshold = DEFAULT_RANGE_THRESHOLD if args.range_threshold is None else args.range_threshold
    # A later --site-species for the same site wins, so that the command line overrides a configuration file.
    per_site = {entry.site: entry.spec for entry in args.site_species}
    # Resolve every spec now, so that a typo fails at start-up, not at the first embedding.
    resolved = {}
    for site, spec in per_site.items():
        try:
            resolved[site] = spec.resolve(labels, range_model, threshold)
        except SpeciesListError as error:
            raise SpeciesListError(f"--site-species {site}={spec}: {error}") from error
    try:
        default = args.default_species.resolve(labels, range_model, threshold)
    except SpeciesListError as error:
        raise SpeciesListError(f"--default-species {args.default_species}: {error}") from error

    def species_for_site(site: str) -> list[str]:
        return resolved.get(site, default)

    return species_for_site


def build_station(
    args: argparse.Namespace,
    state_dir: pathlib.Path,
    broker: tuple[str, int],
    credentials: tuple[str | None, str | None] = (None, None),
    on_detection=None,
    model=None,
    signing_key=None,
    tls=None,
):
    """Create a base station from the command line; species lists are checked here, before it starts."""
    from dawnchorus.models import birdnet
    from dawnchorus.models.backbone import load_source_model
    from dawnchorus.server.station import BaseStation, Shard, StationConfig

    model = model or load_source_model(args.model, args.labels)
    range_model = None if args.model else birdnet.locate_birdnet_files().range_model
    species_for_site = species_resolver(args, model.head.labels, range_model)
    shard = Shard.parse(getattr(args, "shard", "1/1"))
    username, password = credentials
    config = StationConfig(
        broker_host=broker[0], broker_port=broker[1], username=username, password=password, tls=tls,
        state_dir=state_dir, shard=shard,
        adaptation=adaptation_from_args(args), client_id=f"dawnchorus-base-station-{shard.index}-of-{shard.count}",
        signing_key=signing_key,
    )
    return BaseStation(config, model.head, species_for_site, on_detection)


def run_server(args: argparse.Namespace) -> int:
    if args.server_command == "rollback":
        return run_rollback(args)
    if args.server_command == "inspect":
        return run_inspect(args)
    if args.server_command == "export-detections":
        from dawnchorus.server import export
        return export.run(args)
    credentials = mqtt_credentials(args)
    signing_key = signing_key_from_args(args)
    station = build_station(args, args.state_dir, args.broker, credentials, signing_key=signing_key,
                            tls=mqtt_tls(args))
    web = start_web_server(station, args.http) if args.http is not None else None
    station.start()
    notifier = ServiceNotifier("base station", station.health)
    notifier.ready(f"broker {args.broker[0]}:{args.broker[1]}")

    def stop():
        notifier.stopping()
        if web is not None:
            web.stop()
        station.stop()

    _run_until_signal(stop)
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", help="site id")
    parser.add_argument("version", type=int, help="published head version to go back to (1 or more)")
    add_broker_arguments(parser)
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path("state/server"),
                        help="the base station's state directory, which contains the head registry "
                             "(default %(default)s)")
    add_signing_key_argument(parser)


def run_rollback(args: argparse.Namespace) -> int:
    """Publish a signed rollback of a site to a stored head version."""
    import paho.mqtt.client as mqtt

    from dawnchorus.protocol import topics
    from dawnchorus.server.publication import HeadPublisher, load_rollback, publish_rollback
    from dawnchorus.server.registry import HeadRegistry

    topics.validate_id(args.site, "site id")
    if args.version < 1:
        raise ValueError(f"version {args.version} is invalid: version 0 is the source head, which the registry "
                         "does not store. Roll back to a published version, 1 or more")
    if not (args.state_dir / "sites").is_dir():
        raise ValueError(f"{args.state_dir} contains no head registry (no sites/ folder): pass the base station's "
                         "--state-dir")
    username, password = mqtt_credentials(args)
    tls = mqtt_tls(args)
    signing_key = signing_key_from_args(args)
    registry = HeadRegistry(args.state_dir)
    rollback, blob = load_rollback(registry, args.site, args.version)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dawnchorus-rollback-{os.getpid()}")
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        tls.apply(client)
    connack: list = []
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        connack.append(reason_code)
        connected.set()

    client.on_connect = on_connect
    host, port = args.broker
    try:
        client.connect(host, port, keepalive=30)
    except OSError as error:
        raise OSError(f"could not connect to the MQTT broker at {host}:{port}: {error}") from error
    client.loop_start()
    try:
        # Nothing is recorded in the registry unless the broker accepted the connection.
        if not connected.wait(30):
            raise TimeoutError(f"connecting to the MQTT broker at {host}:{port} timed out after 30 s")
        if connack[0].is_failure:
            raise ValueError(f"the MQTT broker at {host}:{port} refused the connection: {connack[0]}")
        manifest, confirmed = publish_rollback(HeadPublisher(client, registry, signing_key), registry,
                                               rollback, blob)
    finally:
        client.disconnect()
        client.loop_stop()
    if not confirmed:
        _LOGGER.error("the broker at %s:%d did not confirm the rollback; run the command again", host, port)
        return 1
    print(f"site {args.site}: rollback to head v{manifest.version} published (sequence {manifest.sequence}); "
          "recorders acknowledge it on the ack topic")
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path("state/server"),
                        help="the base station's state directory (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _format_ranges(ranges) -> str:
    """Format half-open [start, end) ranges as inclusive 'a-b' spans."""
    if not ranges:
        return "none"
    return ", ".join(f"{start}" if end == start + 1 else f"{start}-{end - 1}" for start, end in ranges)


def run_inspect(args: argparse.Namespace) -> int:
    """Print each site's persisted buffer and the sequence numbers accepted per recorder."""
    import json

    from dawnchorus.server.journal import inspect_state

    if not args.state_dir.is_dir():
        raise ValueError(f"state directory {args.state_dir} does not exist: pass the base station's --state-dir")
    sites = inspect_state(args.state_dir)
    if args.json:
        print(json.dumps({"state_dir": str(args.state_dir), "sites": sites}, indent=1))
        return 0
    if not sites:
        print(f"{args.state_dir}: no site has persisted windows")
    for site in sites:
        capacity = site["buffer_capacity"] or "unknown until the first snapshot"
        print(f"site {site['site']}: {site['buffer_windows']} windows in the buffer (capacity {capacity}), "
              f"{site['pending_windows']} since the last round, {site['rounds']} rounds, "
              f"{site['journal_windows']} in the journal after the snapshot")
        for device, entry in site["devices"].items():
            print(f"  {device}: buffer {entry['buffer_windows']} windows ({_format_ranges(entry['buffer_ranges'])}), "
                  f"{entry['buffer_duplicates']} duplicated; accepted {entry['accepted_windows']} "
                  f"({_format_ranges(entry['accepted_ranges'])}); missing between them: "
                  f"{_format_ranges(entry['gaps'])}")
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from dawnchorus.protocol.signing import generate_key_files, key_id, load_public_key

    private_path, public_path = generate_key_files(args.directory)
    print(f"private key (base station --signing-key, keep secret): {private_path}")
    print(f"public key (recorders --head-public-key): {public_path}")
    print(f"key id: {key_id(load_public_key(public_path))}")
    return 0


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dawnchorus.config import CHECKS, ConfigError, run_check

    try:
        return run_check(args, parser, CHECKS)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "build":
        from dawnchorus.evaluation.cli import run_build
        return run_build(args)
    if args.bench_command == "run":
        from dawnchorus.evaluation.runner import run
        return run(args)
    from dawnchorus.evaluation.report import run_report
    return run_report(args)


def build_parser() -> argparse.ArgumentParser:
    from dawnchorus import __version__
    from dawnchorus.config import ConfigurableParser, add_check_arguments
    from dawnchorus.demo import add_demo_arguments
    from dawnchorus.edge import analyze
    from dawnchorus.evaluation.cli import add_build_arguments
    from dawnchorus.evaluation.report import add_report_arguments
    from dawnchorus.evaluation.runner import add_run_arguments

    parser = argparse.ArgumentParser(
        prog="dawnchorus",
        description="Always-on bird acoustic monitoring that adapts BirdNET to each site.",
    )
    parser.add_argument("--version", action="version", version=f"dawnchorus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run broker, base station and recorders on recordings")
    add_demo_arguments(demo)

    edge = commands.add_parser("edge", help="recorder unit").add_subparsers(
        dest="edge_command", required=True, parser_class=ConfigurableParser)
    add_edge_run_arguments(edge.add_parser("run", help="run a recorder unit", config_table="recorder"))

    server = commands.add_parser("server", help="base station").add_subparsers(
        dest="server_command", required=True, parser_class=ConfigurableParser)
    add_server_run_arguments(server.add_parser("run", help="run a base station", config_table="base_station"))
    add_rollback_arguments(server.add_parser(
        "rollback", help="publish a signed rollback of a site to a stored head version",
        description="Publish a stored head version of a site again, signed, as a rollback. Recorders of the "
                    "site apply it although it is older than the head they run, and the base station "
                    "continues adapting from it."))
    add_inspect_arguments(server.add_parser(
        "inspect", help="show each site's persisted buffer and the sequence numbers accepted per recorder",
        description="Read the base station's snapshots and ingest journal under --state-dir and print, per site, "
                    "the windows that a restart would load into the buffer and, per recorder, the sequence numbers "
                    "in the buffer, those accepted and the gaps between them. It needs no model and can run "
                    "while the base station runs."))
    from dawnchorus.server import export
    export.add_arguments(server.add_parser(
        "export-detections", help="write the detection log as BirdNET-Analyzer CSV or Raven selection tables",
        description="Read STATE_DIR/detections.jsonl and write the detections, optionally of some sites, "
                    "recorders or times, as a BirdNET-Analyzer CSV or as one Raven selection table per recorder "
                    "and UTC day. Times count seconds from 00:00:00 UTC of the detection's day. It needs no "
                    "model and can run while the base station runs."))

    keys = commands.add_parser("keys", help="head signing keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser(
        "generate", help="write a new head signing key pair",
        description="Write head-signing.key (the base station's private key, mode 0600) and head-signing.pub "
                    "(the public key for recorders) to DIRECTORY. Existing key files are never overwritten.")
    generate.add_argument("directory", type=pathlib.Path, metavar="DIRECTORY",
                          help="folder for the key files, created with mode 0700 if missing")

    config = commands.add_parser("config", help="configuration files").add_subparsers(
        dest="config_command", required=True)
    add_check_arguments(config.add_parser(
        "check", help="validate a configuration file and print the effective settings",
        description="Validate the [recorder] and [base_station] tables of a TOML configuration file as "
                    "'edge run --config FILE' and 'server run --config FILE' would, including species files "
                    "and thresholds, and print the settings those commands would start with. Starts nothing."))

    analyze_parser = commands.add_parser(
        "analyze", help="analyze files offline, write BirdNET-style CSV or Raven selection tables")
    analyze.add_arguments(analyze_parser)

    bench = commands.add_parser("bench", help="adaptation benchmark on labeled domains")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    add_build_arguments(bench_commands.add_parser("build", help="build a domain's windows and embeddings"))
    add_run_arguments(bench_commands.add_parser("run", help="run and score adaptation methods"))
    add_report_arguments(bench_commands.add_parser("report", help="tables and plots from results JSON"))
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command == "demo":
            from dawnchorus.demo import run_demo
            return run_demo(args)
        if args.command == "edge":
            return run_edge(args)
        if args.command == "server":
            return run_server(args)
        if args.command == "keys":
            return run_keys(args)
        if args.command == "config":
            return run_config(args, parser)
        if args.command == "analyze":
            from dawnchorus.edge import analyze
            return analyze.run(args)
        if args.command == "bench":
            return run_bench(args)
    except (ValueError, OSError) as error:
        _LOGGER.error("%s", error)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
