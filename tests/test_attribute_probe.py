"""The attribute probe reads what a tower's LLaVA tokens encode (drip_demo.attribute_probe)."""
import json

from drip_demo import attribute_probe


def test_probe_decodes_colour_from_a_random_tower(tmp_path, capsys):
    """Even random patch embeddings carry the largest shape's colour; the attention probe must find it (a broken
    extraction, mask or label would leave it at chance), and the table and JSON must hold every attribute."""
    out = tmp_path / "probe.json"
    results = attribute_probe.main(["--towers", "drip-tiny-16-4x", "--n-train", "400", "--n-val", "100",
                                    "--epochs", "15", "--json", str(out)])
    row = results["drip-tiny-16-4x"]
    assert json.loads(out.read_text()) == results
    assert set(row) == {"tokens_per_image", *attribute_probe.ATTRIBUTES}
    assert 1 <= row["tokens_per_image"] < 64  # DRIP-4x: segments, not the 64 patches
    assert row["colour"]["attn"] > 2 * row["colour"]["chance"], row
    assert "| drip-tiny-16-4x |" in capsys.readouterr().out
