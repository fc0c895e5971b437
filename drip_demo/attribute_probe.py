"""What a vision tower's LLaVA tokens encode about the shapes world: small probes per attribute, side by side.

    python -m drip_demo.attribute_probe --towers runs/a/vision_tower,vit-tiny-16 [--n-train 2000 --n-val 500]

For each tower it takes the tokens LLaVA would get (block `--select-layer`, segment tokens + mask), and fits on
train images, scoring val images: a linear probe on the mean-pooled tokens, and an attention-pooling probe on the
tokens (one learned query per attribute), for the largest object's colour and shape, the object count and the
grid cell of the largest object. It answers "can the LLM read X from these tokens at all?" before one spends a
LLaVA run finding out. Images come from `drip_demo.synthetic.make_sample` (same scenes as the demo data).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from drip_demo.synthetic import COLOURS, POSITIONS, SHAPES, make_sample
from drip_llava.model.vision_tower import DripVisionTower, build_vision_tower

ATTRIBUTES = {  # name -> (number of classes, label from a scene record)
    "colour": (len(COLOURS), lambda r: list(COLOURS).index(r["objects"][0]["colour"])),
    "shape": (len(SHAPES), lambda r: SHAPES.index(r["objects"][0]["shape"])),
    "count": (3, lambda r: r["num_objects"] - 1),
    "cell": (len(POSITIONS), lambda r: POSITIONS.index(r["objects"][0]["position"])),
}


@torch.no_grad()
def extract(tower: DripVisionTower, split: str, n: int, seed: int, batch: int = 64):
    """Padded tokens [N,S,D], mask [N,S] and the attribute labels of n images of `split`."""
    tf = tower.image_processor
    feats, labels = [], {k: [] for k in ATTRIBUTES}
    for start in tqdm(range(0, n, batch), desc=f"tokens {split}", leave=False):
        recs, imgs = zip(*(make_sample(seed, split, i) for i in range(start, min(n, start + batch))))
        x, m = tower(torch.stack([tf(im) for im in imgs]))
        feats += [f[k] for f, k in zip(x.float(), m)]  # each image's own tokens, padding dropped
        for k, (_, fn) in ATTRIBUTES.items():
            labels[k] += [fn(r) for r in recs]
    mask = pad_sequence([torch.ones(len(f), dtype=torch.bool) for f in feats], batch_first=True)
    return pad_sequence(feats, batch_first=True), mask, {k: torch.tensor(v) for k, v in labels.items()}


class AttnProbe(nn.Module):
    """One learned query attends over the (masked) tokens, then a linear classifier."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.key = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x, mask):
        x = self.norm(x)
        att = (self.key(x) @ self.query).masked_fill(~mask, float("-inf")).softmax(-1)
        return self.head((att.unsqueeze(-1) * x).sum(1))


class MeanProbe(nn.Module):
    """A linear classifier on the mean of the real (unmasked) tokens."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x, mask):
        m = mask.unsqueeze(-1).float()
        return self.head(self.norm((x * m).sum(1) / m.sum(1).clamp(min=1)))


def fit(probe: nn.Module, train, val, y_train, y_val, epochs: int, lr: float = 3e-3) -> float:
    """AdamW on minibatches of 256 (seeded: the same numbers every run); returns val accuracy in percent."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-2)
    n = len(y_train)
    for _ in range(epochs):
        for idx in torch.randperm(n).split(256):
            loss = nn.functional.cross_entropy(probe(train[0][idx], train[1][idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return 100 * (probe(*val).argmax(-1) == y_val).float().mean().item()


def probe_tower(spec: str, args) -> dict:
    torch.manual_seed(args.seed)  # a preset name builds a random tower: the same one every run
    tower = build_vision_tower(spec, select_layer=args.select_layer).eval()
    train = extract(tower, "train", args.n_train, args.seed)
    val = extract(tower, "val", args.n_val, args.seed)
    dim = train[0].shape[-1]
    row = {"tokens_per_image": round(val[1].sum(1).float().mean().item(), 1)}
    for name, (k, _) in ATTRIBUTES.items():
        chance = 100 * torch.bincount(val[2][name], minlength=k).max().item() / len(val[2][name])
        row[name] = {"chance": round(chance, 1)}
        for kind, cls in (("mean", MeanProbe), ("attn", AttnProbe)):
            row[name][kind] = round(fit(cls(dim, k), train[:2], val[:2], train[2][name], val[2][name],
                                        args.epochs), 1)
    return row


def markdown_table(results: dict) -> list[str]:
    """Rows of a markdown table, one tower per row: val accuracy % mean / attn probe, majority class in brackets."""
    rows = ["| tower | tokens/img | " + " | ".join(f"{a} (mean / attn, chance)" for a in ATTRIBUTES) + " |",
            "|---|---|" + "---|" * len(ATTRIBUTES)]
    for name, r in results.items():
        cells = [f"{r[a]['mean']} / {r[a]['attn']} ({r[a]['chance']})" for a in ATTRIBUTES]
        rows.append(f"| {name} | {r['tokens_per_image']} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", required=True, help="comma-separated DripVisionModel folders or preset names")
    p.add_argument("--select-layer", type=int, default=-2)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="shapes-world seed (the demo uses 0); also seeds random towers")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    results = {spec: probe_tower(spec, args) for spec in args.towers.split(",")}
    print("\n".join(markdown_table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
