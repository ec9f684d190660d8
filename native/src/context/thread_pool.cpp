#include "context/thread_pool.h"

#include <algorithm>
#include <mutex>
#include <vector>

namespace {

struct pool_turns {
    std::mutex                     mutex;
    ggml_threadpool_t              last = nullptr;   // the pool of the latest pass, maybe still polling
    std::vector<ggml_threadpool_t> busy;             // pools computing now (once per graph)
};

pool_turns & turns() {
    // Never destroyed: a context freed (or a pass run by a thread still going) during the process's
    // exit, after static destructors, still finds it.
    static pool_turns * const t = new pool_turns;
    return *t;
}

bool is_busy(const pool_turns & t, ggml_threadpool_t pool) {
    return std::find(t.busy.begin(), t.busy.end(), pool) != t.busy.end();
}

} // namespace

dm_pool_turn::dm_pool_turn(ggml_threadpool_t pool) : pool_(pool) {
    pool_turns & t = turns();
    std::lock_guard<std::mutex> lock(t.mutex);
    // Pausing a pool between its kickoff and its workers' start would strand its graph: only an
    // idle one is paused, and a pool is marked busy (under this lock) before its kickoff.
    if (t.last && t.last != pool && !is_busy(t, t.last)) ggml_threadpool_pause(t.last);
    t.busy.push_back(pool);
    t.last = pool;
}

dm_pool_turn::~dm_pool_turn() {
    pool_turns & t = turns();
    std::lock_guard<std::mutex> lock(t.mutex);
    t.busy.erase(std::find(t.busy.begin(), t.busy.end(), pool_));
}

void dm_threadpool_deleter::operator()(ggml_threadpool_t pool) const {
    {
        pool_turns & t = turns();
        std::lock_guard<std::mutex> lock(t.mutex);
        if (t.last == pool) t.last = nullptr;
    }
    ggml_threadpool_free(pool);
}
