"""``python -m memobench …`` — the same CLI as the ``memobench`` script; what ``accelerate launch -m memobench run …``
and ``torchrun -m memobench run …`` start in every rank."""

from .cli import entry

if __name__ == "__main__":
    entry()
