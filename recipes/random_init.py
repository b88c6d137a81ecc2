"""Export a run's objective untrained (built from its config.yaml with seed 0): the random-init baseline of a
transfer comparison, evaluated by `polymodal eval --model OUT.safetensors` like any trained run.

    python recipes/random_init.py RUN_DIR/config.yaml OUT.safetensors [IMAGE_SIZE]
"""

import json
import sys
from pathlib import Path

import torch
import yaml

from polymodal.pretrain.export import write_safetensors
from polymodal.pretrain.objectives import build_objective

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    cfg = yaml.safe_load(open(sys.argv[1]))
    torch.manual_seed(0)
    objective = build_objective(cfg["objective"])
    size = sys.argv[3] if len(sys.argv) == 4 else "32"
    write_safetensors(objective.state_dict(), Path(sys.argv[2]),
                      {"polymodal.objective": json.dumps(cfg["objective"]), "polymodal.image_size": size})
