"""The README's Python example runs as written, on a checkpoint of a tiny demo-like training run."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignseg.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    """The first ```python block of the README's "## Python" section."""
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.usefixtures("reference_ops")
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_python_example()
    assert len(code.strip().splitlines()) == 5 and "alignseg.load_model" in code
    monkeypatch.chdir(tmp_path)
    # The demo (`alignseg train train.run_dir=runs/demo`), made small: 2 iterations on tiny images.
    assert main(["train", "train.run_dir=runs/demo", f"data.root={tmp_path / 'data'}", "data.synthetic_train=2",
                 "data.synthetic_val=1", "data.synthetic_size=[48,64]", "data.crop_size=[48,48]", "data.batch_size=2",
                 "data.workers=0", "train.iterations=2", "train.progress=false", "train.device=cpu"]) == 0
    assert Path("runs/demo/best.pt").is_file()
    photo = next((tmp_path / "data" / "leftImg8bit" / "val").rglob("*.png"))
    with Image.open(photo) as image:
        image.resize((71, 45)).save("street.png")  # any size

    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)

    label = namespace["label"]
    assert tuple(label.shape) == (45, 71) and int(label.max()) < 19
    with Image.open("street_label.png") as png:
        np.testing.assert_array_equal(np.asarray(png), label.numpy())
    with Image.open("street_overlay.jpg") as overlay:
        assert overlay.size == (71, 45)
