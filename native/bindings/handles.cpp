#include "bindings/handles.h"

#include <algorithm>
#include <string>

py::value_error use_gate::closed_error() const { return py::value_error(std::string("the ") + what_ + " is closed"); }

bool use_gate::try_claim(use_mode mode) {
    if (busy_for(mode)) return false;
    if (mode == use_mode::exclusive) {
        exclusive_ = true;
        owner_ = std::this_thread::get_id();
    } else {
        ++shared_;
    }
    return true;
}

void use_gate::enter(use_mode mode) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (exclusive_ && owner_ == std::this_thread::get_id()) {
            throw py::value_error(std::string("the ") + what_ + " is in use by this thread (a call from its own callback?)");
        }
        if (closed_) throw closed_error();
        if (try_claim(mode)) return;
    }
    bool claimed = false;   // another thread's call holds the object: wait without the GIL, which it may need
    wait_for([&] { return closed_ || (claimed = try_claim(mode)); });
    if (!claimed) throw closed_error();
}

void use_gate::leave(use_mode mode) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (mode == use_mode::exclusive) {
            exclusive_ = false;
            owner_ = std::thread::id();
        } else {
            --shared_;
        }
    }
    changed_.notify_all();
}

bool use_gate::start_closing(bool refuse_own_use) {
    bool first = false;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (refuse_own_use && exclusive_ && owner_ == std::this_thread::get_id()) {
            throw py::value_error(std::string("cannot close the ") + what_ + " from a call on it (its own callback)");
        }
        first = !closed_;
        closed_ = true;
    }
    changed_.notify_all();   // waiting calls give up
    return first;
}

void use_gate::set_freed() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        freed_ = true;
    }
    changed_.notify_all();
}

bool use_gate::is_closed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return closed_;
}

// ---- the handles ---------------------------------------------------------------------------------

ModelHandle::~ModelHandle() {
    gate_.close_now([this] { weights_.reset(); });
}

void ModelHandle::close() {
    gate_.close([] {}, [this] { weights_.reset(); });
}

ContextHandle::ContextHandle(dm_context * ctx, std::shared_ptr<dm_model> weights)
    : native_handle(ctx, "context", use_mode::exclusive), weights_(std::move(weights)),
      n_vocab_(dm_model_n_vocab(weights_.get())) {
    dm_context_set_abort_callback(object_, &ContextHandle::abort_requested, this);
}

ContextHandle::~ContextHandle() {
    gate_.close_now([this] { free_native(); });
}

bool ContextHandle::abort_requested(void * self) {
    return static_cast<const ContextHandle *>(self)->aborting_.load(std::memory_order_relaxed);
}

void ContextHandle::free_native() {
    dm_context_free(object_);   // before the weights it points into
    object_ = nullptr;
    weights_.reset();
}

void ContextHandle::close() {
    gate_.close([this] { aborting_ = true; }, [this] { free_native(); });
}

void ContextHandle::check(bool ok) const {
    if (!ok && aborting_) throw py::value_error("the context was closed during the call");
    ::check(ok);
}

SamplerHandle::~SamplerHandle() {
    gate_.close_now([this] { dm_sampler_free(object_); });
}

void SamplerHandle::close() {
    gate_.close([] {}, [this] { dm_sampler_free(object_); });
}

void take_in_address_order(std::vector<pending_use> uses, const std::function<std::string(size_t, size_t)> & twice) {
    std::vector<size_t> order(uses.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return std::less<const void *>()(uses[a].handle, uses[b].handle); });
    for (size_t k = 1; k < order.size(); ++k) {
        if (uses[order[k]].handle == uses[order[k - 1]].handle) throw py::value_error(twice(order[k], order[k - 1]));
    }
    for (size_t i : order) uses[i].take();
}
