"""The docs' getting-started page, as a script that runs (record -> analyse -> plot, ~10 s on a CPU).

    python examples/getting_started.py [--out runs/first]
"""

# --8<-- [start:setup]
import sys

import torch

import phasewatch
from phasewatch.plot import overview, save

out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "runs/first"
torch.manual_seed(0)
x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))           # a toy task: random labels
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
# --8<-- [end:setup]

# --8<-- [start:loop]
with phasewatch.Recorder(out, model, opt, k=16) as rec:             # 1. record
    for step in range(1, 301):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.loss(loss)
        opt.step()
        if step % 10 == 0:
            rec.log(step, train_acc=(model(x).argmax(1) == y).float().mean().item())

res = phasewatch.analyze(out, window=10)                           # 2. analyse (numpy only)
print(res.summary())
save(overview(res), f"{out}/overview.png")                         # 3. plot
# --8<-- [end:loop]
print(f"wrote {out}/overview.png")
