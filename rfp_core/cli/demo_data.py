"""`rfp demo_data`."""

from __future__ import annotations


def add_parser(sub) -> None:
    demo_data = sub.add_parser("demo-data", help="generate the two-domain demo dataset")
    demo_data.add_argument("out")
    demo_data.add_argument("--num", type=int, default=None, help="images per domain")
    demo_data.add_argument("--size", type=int, default=None)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(handler=run)


def run(args) -> int:
    from rfp_core.media.demo_data import DEFAULT_NUM, DEFAULT_SIZE, make_demo_data

    num = args.num if args.num is not None else DEFAULT_NUM
    size = args.size if args.size is not None else DEFAULT_SIZE
    data = make_demo_data(args.out, num=num, size=size, seed=args.seed)
    what = "created" if data.created else "already complete, kept"
    print(f"demo data {what}: {num} images + 1 video per domain, {size} px, seed {args.seed}")
    print(f"  domain 0 (flat warm shapes):     {data.domain0}")
    print(f"  domain 1 (striped cool shapes):  {data.domain1}")
    print(f"  true shape masks:                {data.root / 'masks'}")
    print(data.root.resolve())
    return 0
