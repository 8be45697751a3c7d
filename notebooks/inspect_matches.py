# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect the matches of a memorization audit
#
# Loads the detect stage's outputs of one run directory and shows, for each flagged prompt,
# a few samples of its clique of near-identical generations beside the closest training image,
# with the distances that decided it. Set `RUN_DIR` below, or the environment variable
# `MEMAUDIT_RUN_DIR`. Edit `notebooks/inspect_matches.py`; the `.ipynb` is generated from it
# (`jupytext --sync notebooks/inspect_matches.py`).

# %%
import os
from pathlib import Path

# Jupyter starts the kernel in notebooks/, hence the "..".
RUN_DIR = Path(os.environ.get("MEMAUDIT_RUN_DIR", "../outputs/demo"))
MEMBERS_SHOWN = 4  # clique members per flagged prompt
MAX_PROMPTS = 20

# %%
import matplotlib.pyplot as plt

from pipeline.report import flagged_prompts, load_run, load_thumbnail
from pipeline.text import display_text

results = load_run(RUN_DIR / "detect")
memorized = results.memorized
print(f"{len(memorized)} prompts screened, {int(memorized['flagged'].sum())} flagged", end="")
if results.extracted is not None:
    print(f", {int(results.extracted['extracted'].sum())} extracted")
else:
    print(" (not verified against training images)")
print("settings:", results.summary.get("settings"))

# %% [markdown]
# ## Prompts by clique size
# Every prompt screened, largest cliques first; `flagged` marks a clique of at least `min_clique`.
# Prompt ids, captions, file names and training keys come from other tools' folders and the web:
# `display_text` shows their control and bidi-control characters as escapes and shortens them.

# %%
columns = ["prompt_id", "caption", "n_samples", "clique_size", "flagged", "max_pair_distance", "median_pair_distance"]
table = memorized.sort_values("clique_size", ascending=False)[columns].head(20)
table.assign(
    prompt_id=table["prompt_id"].map(lambda v: display_text(v, 40)),
    caption=table["caption"].map(lambda v: display_text(v, 80)),
)

# %% [markdown]
# ## Flagged prompts: generations beside the closest training image

# %%
flagged = flagged_prompts(results).head(MAX_PROMPTS)
for row in flagged.itertuples(index=False):
    files = [row.representative_file] + [f for f in row.member_files if f != row.representative_file]
    files = files[:MEMBERS_SHOWN]
    verified = isinstance(row.train_key, str) and row.train_key != ""
    panels = len(files) + (1 if verified else 0)
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels, 2.6), squeeze=False)
    for ax, file in zip(axes[0], files):
        image = load_thumbnail(results.sample_path(file), 256)
        if image is not None:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(display_text(file.rsplit("/", 1)[-1], 30), fontsize=8)
    if verified:
        ax = axes[0][-1]
        image = load_thumbnail(results.match_path(row.prompt_id), 256)
        if image is not None:
            ax.imshow(image, interpolation="nearest")
        verdict = "extracted" if row.extracted else "not a match"
        ax.set_title(f"train {display_text(row.train_key, 30)}\nL2 {row.distance:.3f} ({verdict})", fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(
        f"{display_text(row.prompt_id, 40)}: \"{display_text(row.caption, 60)}\"\nclique {row.clique_size}/{row.n_samples}, "
        f"max distance in clique {row.max_pair_distance:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    plt.show()
if flagged.empty:
    print("no flagged prompt in", RUN_DIR)
