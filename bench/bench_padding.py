"""The padding of micro-batches with and without --group_by_length, on a mix665k-like length mix.

    python -m bench.bench_padding [--samples 20480] [--draws 3]

Lengths are drawn, not read: 6.2% text-only samples (mix665k's ~41k ShareGPT conversations: a
log-normal of median ~500 tokens) and the rest an image's 729 tokens plus a short answer or a few
turns (log-normal, median ~70 tokens, a long tail). The loop's own order (data.epoch_order) of 8
processes, micro-batches of 8, global batch 128; the padding is the share of a micro-batch's tokens
(its longest sample's length times its samples) that no sample fills. Printed over draws of the
lengths and the seed, with their spread.
"""

import argparse
import random
import statistics

import data


class Lengths:
    """What epoch_order reads of a data set: (id, image or None, conversation) rows."""

    def __init__(self, n, seed, image_tokens=729):
        r = random.Random(seed)
        self.n_image_tokens = image_tokens
        self.rows = []
        for i in range(n):
            text_only = r.random() < 0.062
            chars = int(r.lognormvariate(7.6, 0.8) if text_only else r.lognormvariate(5.6, 1.0))
            self.rows.append((i, None if text_only else "image", [{"value": "x" * chars}]))

    def __len__(self):
        return len(self.rows)


def padding(ds, grouped, seed, world=8, batch=8, global_batch=128):
    image = ds.n_image_tokens
    length = [len(c[0]["value"]) // 4 + (im is not None) * image for _, im, c in ds.rows]
    real = padded = 0
    for rank in range(world):
        order = data.epoch_order(ds, global_batch, batch, world, rank, seed, 0, grouped)
        for j in range(0, len(order), batch):
            micro = [length[i] for i in order[j : j + batch]]
            real += sum(micro)
            padded += max(micro) * len(micro)
    return 1 - real / padded


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=20480)
    ap.add_argument("--draws", type=int, default=3)
    a = ap.parse_args()
    for grouped in (False, True):
        xs = [100 * padding(Lengths(a.samples, s), grouped, s) for s in range(a.draws)]
        each = ", ".join(f"{x:.1f}" for x in xs)
        print(
            f"--group_by_length {'on ' if grouped else 'off'}: padding {statistics.mean(xs):.1f}% "
            f"of the tokens (sd {statistics.stdev(xs):.1f} over {a.draws} draws: {each})"
        )


if __name__ == "__main__":
    main()
