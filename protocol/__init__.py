"""The shared wire format of recorders and base stations: MQTT topics, payload codecs and manifests.

Imports neither TensorFlow nor LiteRT, so both sides can depend on it.
"""
