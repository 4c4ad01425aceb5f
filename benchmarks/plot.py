"""Plot ``benchmarks/sweep.json`` (from ``bench_adapters.py --sweep``) as
``benchmarks/scaling.png``: time per call vs input size, log-log, for the clone of
the same bytes, the metatensor chain and the adapters (TensorMapToIrreps forward;
IrrepsToTensorMap forward against the hand-written inverse, where the file has them).

    python benchmarks/plot.py [--input benchmarks/sweep.json] [--output benchmarks/scaling.png]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

#: (key in sweep.json, label, style)
SERIES = [
    ("clone", "torch.clone of the same bytes", dict(color="black", marker="o", ls="--")),
    ("chain", "metatensor chain (featomic basis)", dict(color="tab:red", marker="s")),
    ("chain e3nn", "metatensor chain + e3nn basis", dict(color="tab:red", marker="s", ls=":")),
    ("eager", "TensorMapToIrreps eager (featomic)", dict(color="tab:blue", marker="^")),
    ("script", "TensorMapToIrreps script (featomic)", dict(color="tab:green", marker="v")),
    ("script e3nn", "TensorMapToIrreps script (e3nn)", dict(color="tab:green", marker="v", ls=":")),
    ("script fused", "TensorMapToIrreps script, kernel=fused", dict(color="tab:purple", marker="D")),
    ("script fused e3nn", "TensorMapToIrreps script, kernel=fused (e3nn)",
     dict(color="tab:purple", marker="d", ls=":")),
    ("inverse chain", "hand-written inverse chain (featomic)",
     dict(color="tab:orange", marker="x", ls="-.")),
    ("inverse script fused", "IrrepsToTensorMap script, kernel=fused",
     dict(color="tab:brown", marker="P", ls="-.")),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=os.path.join(HERE, "sweep.json"))
    parser.add_argument("--output", default=os.path.join(HERE, "scaling.png"))
    args = parser.parse_args(argv)
    with open(args.input) as f:
        data = json.load(f)
    records = data["records"]
    by_atoms = sorted((r for r in records if r["lmax"] == 6), key=lambda r: r["bytes"])
    atoms_2000 = {r["atoms"] for r in records if r["lmax"] != 6}
    by_lmax = sorted(
        (r for r in records if r["atoms"] in atoms_2000), key=lambda r: r["lmax"]
    )

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    for ax, rows, title in (
        (axes[0], by_atoms, "atoms sweep, lmax 6"),
        (axes[1], by_lmax, f"lmax sweep, {sorted(atoms_2000)[0] if atoms_2000 else '?'} atoms"),
    ):
        x = [r["bytes"] / 1e6 for r in rows]
        for key, label, style in SERIES:
            if all(key in r["seconds"] for r in rows):
                ax.plot(x, [r["seconds"][key] for r in rows], label=label, **style)
        for r, xi in zip(rows, x):
            text = f"{r['atoms']} at." if ax is axes[0] else f"l={r['lmax']}"
            ax.annotate(text, (xi, r["seconds"]["clone"]), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("float32 block values (MB)")
        ax.set_ylabel("median time per forward call (s)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    m = data["machine"]
    fig.suptitle(
        f"TensorMapToIrreps / IrrepsToTensorMap forward vs clone and the chains — {m['cpu']}, "
        f"{m['torch threads']} threads, torch {m['torch']}, 3 atom types, "
        f"{data['radial']} radial; GPU unmeasured",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
