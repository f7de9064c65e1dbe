"""Run by tests/test_sharding.py, alone or under torchrun: the API's evaluation of a tiny CNN on digits."""
import json, sys, time, torch
from torch import nn
import robustedge
from robustedge.sharding import init_from_env, leave

def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

def main() -> None:
    weights, out, n, block = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    world, _ = init_from_env(torch.device("cpu"))
    model = tiny(); model.load_state_dict(torch.load(weights, weights_only=True))
    data = robustedge.load_dataset("digits", image_size=8, channels=1).test.take(n)
    t = time.perf_counter()
    report = robustedge.evaluate(model, data.images, data.labels, attacks="clean,pgd20,autoattack", eps=0.1,
                                 aa_batch_size=block, batch_size=block, flags=False, show_progress=False,
                                 distributed=world.size > 1)
    if world.main:
        json.dump({"correct": report.correct, "accuracy": report.accuracy, "seconds": time.perf_counter() - t,
                   "processes": report.info["processes"]}, open(out, "w"))
    leave()


if __name__ == "__main__":
    main()
