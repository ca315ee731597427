"""The server's running batch: requests join it and leave it between decoding steps (continuous
batching), so that a request that arrives while others are decoding waits one step, not until
the whole batch has finished, and a request that ends frees its row at once.

The rows share one left-padded key/value cache (``ReservedLayer`` buffers). Joining requests run
their prompts' forward pass together, and their keys and values are copied into the block,
right-aligned with the rows already there. A row that ends stays in the block, computing tokens
nobody receives, until the next join regroups the block (or until ended rows are half of it):
regrouping copies the whole cache, and one more row costs a decoding step little (it reads the
same weights), so a row that ends is most often replaced by the next request at one regrouping.
The columns no row needs any more go at each regrouping. Each row keeps its own positions, and its keys carry their rotary
embedding, so moving a row's keys within the block changes nothing it computes: a row decodes
the tokens it would decode alone (the tests compare).

    batch = RunningBatch(model, eos_ids=[2], pad_id=0, temperature=0.0, top_p=1.0)
    batch.join(jobs)                 # after the prompts' forward pass, each row has its next-token logits
    while batch.rows:                # the rows still decoding
        ended = batch.step()         # one token for every row, sent to its job; the ended rows leave
"""

import torch

from tunelab.models.sampling import ReservedLayer, _Decoder, draw, filter_logits, reserved_cache


def supports_running_batches(model) -> bool:
    """Whether ``model``'s cache can be regrouped: every layer attends to the whole sequence."""
    cache = reserved_cache(model.config, 1)
    return all(isinstance(layer, ReservedLayer) for layer in getattr(cache, "layers", []))


class RunningBatch:
    """Jobs (``tunelab.deploy.server.Job``) decoded together with one sampling setting.

    ``prepare(jobs)``: sets the model up for these rows (a mixed-adapter batch names each row's
    adapter), called before every forward pass."""

    def __init__(self, model, eos_ids, pad_id: int, temperature: float, top_p: float, prepare=None):
        self.decoder, self.config = _Decoder(model), model.config
        self.ends = set(eos_ids)
        self.pad_id, self.temperature, self.top_p = pad_id, temperature, top_p
        self.prepare = prepare or (lambda jobs: None)
        self.device = next(model.parameters()).device
        self.block: list = []  # the jobs, one per row of the cache, ended ones included until the next regrouping
        self.cache = self.mask = self.positions = self.logits = None

    @property
    def rows(self) -> list:
        """The jobs still decoding."""
        return [job for job in self.block if job.finish is None]

    def settings(self) -> tuple:
        return (self.temperature, self.top_p)

    def join(self, jobs: list) -> None:
        """Run the prompts of ``jobs`` (left-padded together) and add them as rows."""
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[r, width - len(job.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = reserved_cache(self.config, width)
        self.prepare(jobs)
        logits = self.decoder(ids, mask, positions, cache)
        self._regroup([r for r, job in enumerate(self.block) if job.finish is None], (jobs, cache, mask, positions[:, -1] + 1, logits))

    def step(self) -> list:
        """One token for every row: chosen from its logits, sent to its job; the rows that end
        (end of sequence or their ``max_tokens``) leave (from the cache once they are half of it);
        the block runs one forward pass. Returns the jobs that ended."""
        if self.temperature == 0:
            tokens = self.logits.argmax(dim=-1)
        else:
            tokens = draw(torch.softmax(filter_logits(self.logits.float() / self.temperature, 0, self.top_p), dim=-1))
        ended, keep = [], []
        for r, (job, token) in enumerate(zip(self.block, tokens.tolist())):
            if job.finish is not None:  # ended before (or cancelled by its server): no token
                continue
            if token in self.ends:
                job.finish = "stop"
            else:
                job.tokens.append(token)
                job.send(("token", token))
                if len(job.tokens) >= job.max_tokens:
                    job.finish = "length"
            if job.finish is None:
                keep.append(r)
            else:
                job.send(("done", job.finish))
                ended.append(job)
        if not keep:
            self.fail()
        elif 2 * len(keep) <= len(self.block):
            tokens = tokens[keep]
            self._regroup(keep)
        if self.block:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.block), 1)], dim=1)
            self.prepare(self.block)
            self.logits = self.decoder(tokens[:, None], self.mask, self.positions[:, None], self.cache)
            self.positions = self.positions + 1
        return ended

    def fail(self) -> list:
        """Drop every row (after an error, or when none is decoding); returns the jobs still decoding."""
        jobs, self.block = self.rows, []
        self.cache = self.mask = self.positions = self.logits = None
        return jobs

    def _regroup(self, keep: list[int], joining: tuple | None = None) -> None:
        """Keep the rows ``keep`` and add ``joining`` = (jobs, their cache, mask, next positions,
        logits): a new block, as short as the rows need, with room for every row's last token."""
        rows = [self.block[r] for r in keep] + (joining[0] if joining else [])
        if not rows:
            self.fail()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        start = 0
        masks, positions, logits = [], [], []
        if keep:
            kept = self.mask[index]
            start = int((kept.cumsum(-1) == 0).sum(-1).min())  # the columns before every kept row's first token
            masks.append(kept[:, start:])
            positions.append(self.positions[index])
            logits.append(self.logits[index])
        if joining:
            masks.append(joining[2])
            positions.append(joining[3])
            logits.append(joining[4])
        length = max(m.shape[1] for m in masks)
        room = max(j.max_tokens - len(j.tokens) for j in rows) + 1
        if self.cache is None:  # the first rows: their own cache, with room made
            self.cache = joining[1]
            for layer in self.cache.layers:
                layer.regroup(torch.arange(len(rows), device=self.device), 0, None, length, length + room)
        else:
            for k, layer in enumerate(self.cache.layers):
                layer.regroup(index, start, joining[1].layers[k] if joining else None, length, length + room)
        self.mask = torch.cat([torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in masks])
        self.positions, self.logits, self.block = torch.cat(positions), torch.cat(logits), rows
