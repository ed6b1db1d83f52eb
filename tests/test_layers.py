"""The layering the design promises: the Discord side and the queue load without the ML stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_ML = textwrap.dedent("""
    import sys

    class NoML:
        '''Refuses torch and DiffSynth (and their compiled kin) as if they were not installed.'''
        BLOCKED = ("torch", "torchvision", "diffsynth", "triton", "transformers", "modelscope")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoML())
    import bot.jobs, bot.store, bot.discord.app, bot.discord.commands, bot.discord.delivery, bot.discord.views, bot.discord.interactions
    import bot.engine.api
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in NoML.BLOCKED)
    print("loaded:", loaded)
""")


def test_the_discord_side_and_the_queue_import_without_torch_or_diffsynth():
    done = subprocess.run([sys.executable, "-c", WITHOUT_ML], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout


def test_the_blocker_really_blocks():
    """The check above could pass by accident if the blocker let torch through."""
    script = WITHOUT_ML.replace("import bot.jobs,", "import bot.engine.pipeline, bot.jobs,")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked by the test" in done.stderr
