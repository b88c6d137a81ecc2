"""Model towers built from open_clip, timm and transformers configs."""
