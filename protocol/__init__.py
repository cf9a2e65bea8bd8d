"""What recorders and base stations share: MQTT topics, payload codecs and manifests.

Imports neither TensorFlow nor LiteRT, so both sides can depend on it.
"""
