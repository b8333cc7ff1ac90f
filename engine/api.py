"""vivace: a fast inference engine for token-based text-to-music models."""
from vivace.arguments import Story
from vivace.async_engine import AsyncEngine
from vivace.codecs.codec_pack import Codec
from vivace.core.sampling import SamplingParams
from vivace.engine import Engine
from vivace.errors import EngineBusy, PackError, VivaceError
from vivace.events import AudioChunk, StageProgress, WindowFinished, WindowStarted

__version__ = "0.1.0"
__all__ = [
    "AsyncEngine", "AudioChunk", "Codec", "Engine", "EngineBusy", "PackError", "SamplingParams", "StageProgress", "Story",
    "VivaceError", "WindowFinished", "WindowStarted", "__version__",
]
