"""Offline evaluation: labeled benchmark domains built from real recordings, metrics and
adaptation methods.

This module stays free of TensorFlow so that the command line can list the methods.
"""

# Method names of ``dawnchorus bench run``, in the order of its tables.
METHOD_NAMES = ("source", "prior-shift", "notela", "notela-streaming", "notela-streaming-source-teacher",
                "notela-streaming-prior-shift",
                "dropout-student", "pseudo-label", "tent", "shot", "nrc", "dust")
