"""MusicGen: delay-interleaved EnCodec codebooks from one decoder, text by cross-attention, melody by prefix."""
