"""The token-budget scheduler on the host: chunked prefill, decode-first, preemption, page accounting."""
from jaxserve.block_pool import BlockPool
from jaxserve.config import SchedulerConfig
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler


def make_request(rid, prompt_len, start=0):
    return Request(request_id=rid, prompt_token_ids=list(range(start, start + prompt_len)),
                   params=SamplingParams(max_tokens=8), seed=0, max_tokens=8, eos_token_ids=(0,))


def run_step(sched):
    """Schedule, then pretend the model ran: every sampling sequence gets token 7."""
    out = sched.schedule()
    sched.update_after_step(out)
    for seq in out.seqs:
        if seq.samples:
            seq.request.output_token_ids.append(7)
    return out


def test_prompts_are_chunked_to_the_budget_and_decodes_go_first():
    pool = BlockPool(num_pages=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8), pool)
    a, b = make_request("a", 6), make_request("b", 10, start=100)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(q.request.request_id, q.num_tokens) for q in out.seqs] == [("a", 6), ("b", 2)]
    assert out.seqs[0].samples and not out.seqs[1].samples
    assert out.num_prompt_tokens == 8
    out = run_step(s)   # a decodes (1 token) first, b continues its prompt with the rest of the budget
    assert [(q.request.request_id, q.num_tokens) for q in out.seqs] == [("a", 1), ("b", 7)]
    assert out.num_prompt_tokens == 7  # a's decode computes no prompt token
    out = run_step(s)
    assert [(q.request.request_id, q.num_tokens) for q in out.seqs] == [("a", 1), ("b", 1)]
    assert out.seqs[1].samples and b.num_computed_tokens == 10 and out.num_prompt_tokens == 1


def test_out_of_pages_preempts_the_newest_and_recomputes_it():
    pool = BlockPool(num_pages=5, block_size=4)   # 4 usable pages = 16 tokens
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32), pool)
    a, b = make_request("a", 8), make_request("b", 8, start=50)
    s.add(a)
    s.add(b)
    run_step(s)                      # both prompts: 2 pages each, all 4 pages used
    assert pool.num_free_pages == 0
    out = run_step(s)                # a needs a 3rd page at token 8: b (newest) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and b.output_token_ids == [7]    # outputs survive preemption
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    out = run_step(s)                # b comes back: its first page is still in the prefix cache,
    assert b.num_cached_tokens == 4  # the rest of the prompt and its output token are recomputed
    assert [(q.request.request_id, q.num_tokens) for q in out.seqs] == [("b", 5)]
    assert out.num_prompt_tokens == 4  # its prompt recomputed past the cached page; its output token is not one
    s.finish(b, RequestStatus.FINISHED_STOPPED)
    assert pool.num_free_pages == 4


def test_max_num_seqs_caps_running_requests():
    pool = BlockPool(num_pages=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64), pool)
    reqs = [make_request(str(i), 3, start=10 * i) for i in range(3)]
    for r in reqs:
        s.add(r)
    out = run_step(s)
    assert len(out.seqs) == 2 and reqs[2].status == RequestStatus.WAITING


def test_token_ids_between_is_a_slice_of_all_tokens():
    req = make_request("r", 5, start=10)
    req.output_token_ids.extend([90, 91, 92])
    everything = req.all_token_ids()
    for start in range(len(everything) + 1):
        for end in range(start, len(everything) + 1):
            assert req.token_ids_between(start, end) == everything[start:end], (start, end)


def _check_block_table(s, reqs):
    rows = [r.block_row for r in reqs if r.block_row is not None]
    assert len(rows) == len(set(rows)), "two requests share a block table row"
    for r in reqs:
        if r.block_row is None:
            assert r.block_ids == []
        else:
            row = s.block_table.pages[r.block_row]
            assert row[:len(r.block_ids)].tolist() == r.block_ids
            assert (row[len(r.block_ids):] == 0).all(), "stale page ids past the request's own"
    free = sorted(set(range(len(s.block_table.pages))) - set(rows))
    assert (s.block_table.pages[free] == 0).all()


def test_block_table_rows_mirror_the_page_lists_through_preemption_and_prefix_hits():
    import random

    rng = random.Random(0)
    pool = BlockPool(num_pages=12, block_size=4)  # tight: preemptions happen
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=3, max_num_batched_tokens=16), pool)
    reqs = [make_request(str(i), rng.randint(2, 14), start=100 * (i % 3)) for i in range(9)]  # shared prefixes
    for r in reqs:
        s.add(r)
    preempted = 0
    for _ in range(60):
        out = run_step(s)
        preempted += len(out.preempted)
        for seq in out.seqs:
            if seq.samples and len(seq.request.output_token_ids) >= 6:
                s.finish(seq.request, RequestStatus.FINISHED_LENGTH)
        _check_block_table(s, reqs)
    assert preempted and all(r.is_finished for r in reqs) and pool.num_free_pages == 11
