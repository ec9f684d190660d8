// The contexts' thread pools, and their turns on the CPU.
//
// After a graph, a pool's workers poll for the next one for a while (dm_context_params.poll) before
// they sleep: a decode loop then starts each step without waking threads. But a pool left polling
// while another context's pool computes takes cores from it, so two contexts decoding in turn (two
// chats, or a bare model and one with an adapter, in one process) each ran 2-5x slower. A pass
// therefore takes a turn: the pool that ran the previous pass, if it is another one and idle, is
// paused (its workers sleep until ggml's next kickoff on it wakes them). Pools computing at the
// same time (from several threads) are never paused: a pause lands only between graphs.
#pragma once

#include <ggml-cpu.h>

#include <memory>

// Forgets the pool's turns, then frees it.
struct dm_threadpool_deleter {
    void operator()(ggml_threadpool_t pool) const;
};
using dm_threadpool_ptr = std::unique_ptr<ggml_threadpool, dm_threadpool_deleter>;

// Held for the time one graph computes on pool.
class dm_pool_turn {
public:
    explicit dm_pool_turn(ggml_threadpool_t pool);
    ~dm_pool_turn();
    dm_pool_turn(const dm_pool_turn &) = delete;
    dm_pool_turn & operator=(const dm_pool_turn &) = delete;

private:
    ggml_threadpool_t pool_;
};
