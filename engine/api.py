"""vivace: a fast inference engine for token-based text-to-music models."""
from vivace.config import SamplingParams
from vivace.engine import Engine, Story
from vivace.errors import PackError, VivaceError
from vivace.events import AudioChunk, StageProgress, WindowFinished, WindowStarted

__version__ = "0.1.0"
__all__ = [
    "AudioChunk", "Engine", "PackError", "SamplingParams", "StageProgress", "Story", "VivaceError",
    "WindowFinished", "WindowStarted", "__version__",
]
