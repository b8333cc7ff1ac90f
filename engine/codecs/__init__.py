"""Codecs: codes -> PCM. The SoundStream and EnCodec decoders, the backends that run them, streaming decode."""
