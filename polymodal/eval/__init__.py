"""Downstream evaluation behind one encoder interface (`encoders.Encoder`: polymodal runs, open_clip, timm,
EfficientNet-Lite0): zero-shot classification, image-text retrieval (ties count against the model), linear probe
and kNN (`tasks`), run over models x datasets x tasks by `polymodal eval` (`cli`, `suite`: JSON, CSV, markdown,
chart), with features encoded on every rank, gathered and cached (`features`), and the end-of-training retrieval
and zero-shot evaluation of the contrastive objectives (`training_eval`)."""
