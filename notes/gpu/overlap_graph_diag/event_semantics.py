"""Does a CUDA graph's external-event wait hold mid-graph, with the host ahead? (notes/gpu/NOTES.md, session 17)

    python3 notes/gpu/overlap_graph_diag/event_semantics.py graph|graph-nowait|eager

Prints the value each of 12 replays read after waiting for a side stream's slow write: 0..11 when the wait
holds. Session 17 ran an earlier form (the wait at the graph's head, no control): 0..11 for graph and eager.
This form puts kernels before the wait and adds graph-nowait, the control that must read stale values
(if it does not, the two streams were serialized by something else and the test proves nothing): not yet run.
"""
import sys
import torch

mode = sys.argv[1]  # "graph", "graph-nowait" (control) or "eager"
side, main = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)
E = torch.cuda.Event(external=True)
X = torch.zeros(1, device="cuda")
Y = torch.zeros(1, device="cuda")
with torch.cuda.stream(side):
    E.record()
torch.cuda.synchronize()
g = None
if mode.startswith("graph"):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(3):
            Y.add_(1)  # kernels before the wait: a wait node mid-graph
        if "nowait" not in mode:
            torch.cuda.current_stream().wait_event(E)
        Y.copy_(X)
torch.cuda.synchronize()
seen = []
with torch.cuda.stream(main):
    for i in range(12):
        if g is not None:
            g.replay()
        else:
            main.wait_event(E)
            Y.copy_(X)
        seen.append(Y.clone())
        side.wait_stream(main)
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)
            X.fill_(i + 1)
            E.record()
torch.cuda.synchronize()
print(mode, "expected", list(range(12)), "seen", [int(s.item()) for s in seen], flush=True)
