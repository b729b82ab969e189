"""Text conditioning: T5 tokenizers and the Flax T5 encoder's checkpoint loader (PixArt-alpha's captions)."""
