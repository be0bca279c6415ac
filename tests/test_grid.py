"""The run's image grid (``memobench.grid.write_grid``)."""


def test_grid_labels_the_shown_reference_when_a_prompt_has_several(tmp_path):
    """Non-memorized prompts are scored against every memorized image: the grid must not present the first of them
    as the prompt's training original without saying so (a label row under the reference cell)."""
    import numpy as np
    from PIL import Image

    from memobench.api import Prompt, Sample
    from memobench.grid import write_grid

    img = np.zeros((8, 8, 3), np.uint8)

    def height(n_refs: int) -> int:
        p = Prompt(id="p", text="a prompt", reference_ids=tuple(f"r{i}" for i in range(n_refs)))
        samples = [Sample(sample_key=f"k{s}", prompt=p, seed=s, image=img, references=[img] * n_refs)
                   for s in range(2)]
        write_grid(samples, tmp_path / f"{n_refs}.png")
        with Image.open(tmp_path / f"{n_refs}.png") as im:
            return im.size[1]

    assert height(2) == height(1) + 12
