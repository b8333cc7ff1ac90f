"""The MusicLM hierarchy: semantic -> coarse -> fine acoustic tokens -> SoundStream decoder."""
