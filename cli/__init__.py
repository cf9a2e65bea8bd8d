"""dawnchorus: always-on bird acoustic monitoring that adapts BirdNET to each site."""

__version__ = "0.1.0"
