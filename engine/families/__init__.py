"""Model families: each turns requests into sequences for the engine core and their tokens into audio."""
