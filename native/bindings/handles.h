// The Python handles over the C API's objects (model, context, sampler) and the rule that keeps
// them safe: a native object is never freed while a call uses it.
//
// Calls run on a native object with the GIL released, so any other Python thread may close its
// handle meanwhile. Every call therefore holds a use of the object for as long as it touches it
// (use_scope). close() marks the handle closed, so that later calls raise ValueError, asks running
// work to stop where it can (a context aborts its decode), waits for the uses in flight to end and
// frees the object before it returns. Uses of a model are shared (tokenizing, making contexts: many
// threads at once); uses of a context or a sampler are exclusive, which serialises the calls of
// several threads on one of them.
#pragma once

#include "bindings/bindings.h"

#include <atomic>
#include <functional>
#include <string>
#include <vector>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

enum class use_mode { shared, exclusive };

// Uses in flight on one native object, and whether its handle is closed.
class use_gate {
  public:
    explicit use_gate(const char * what) : what_(what) {}
    use_gate(const use_gate &) = delete;
    use_gate & operator=(const use_gate &) = delete;

    // Starts a use, waiting (GIL released) while the object is busy for this mode. Raises
    // ValueError when the handle is closed, or when this thread holds an exclusive use already
    // (a callback calling back into the object would wait for itself).
    void enter(use_mode mode);
    void leave(use_mode mode);

    // Closes the handle: new uses raise from now on; stop() (may be empty) asks the uses in flight
    // to end soon; once they have ended (waiting with the GIL released), free() frees the object.
    // Returns after the object is freed, also when another thread's close() frees it.
    template <typename Stop, typename Free>
    void close(Stop stop, Free free);
    // For destructors, which never wait: frees the object now unless a use is still in flight (a
    // thread stopped by the interpreter's exit can hold one forever), in which case it stays.
    template <typename Free>
    void close_now(Free free);

    bool is_closed() const;
    const char * what() const { return what_; }

  private:
    bool busy_for(use_mode mode) const { return exclusive_ || (mode == use_mode::exclusive && shared_ > 0); }
    bool idle() const { return !exclusive_ && shared_ == 0; }
    bool try_claim(use_mode mode);   // under the mutex: starts the use when the object is free for it
    py::value_error closed_error() const;
    // Marks the handle closed; true for the caller that must free the object. A closing thread
    // that holds the exclusive use itself would wait for itself: refuse_own_use raises then.
    bool start_closing(bool refuse_own_use);
    // Waits, GIL released, until done() holds (checked under the mutex).
    template <typename Done>
    void wait_for(Done done);
    void set_freed();

    const char *            what_;
    mutable std::mutex      mutex_;
    std::condition_variable changed_;
    int                     shared_ = 0;
    bool                    exclusive_ = false;
    std::thread::id         owner_;   // thread of the exclusive use
    bool                    closed_ = false;
    bool                    freed_ = false;
};

template <typename Done>
void use_gate::wait_for(Done done) {
    py::gil_scoped_release nogil;   // the uses in flight may need the GIL to end (a streaming callback)
    std::unique_lock<std::mutex> lock(mutex_);   // released before the GIL is taken back
    changed_.wait(lock, done);
}

template <typename Stop, typename Free>
void use_gate::close(Stop stop, Free free) {
    if (!start_closing(true)) {
        wait_for([this] { return freed_; });
        return;
    }
    stop();
    wait_for([this] { return idle(); });
    free();
    set_freed();
}

template <typename Free>
void use_gate::close_now(Free free) {
    if (!start_closing(false)) return;
    bool can_free = false;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        can_free = idle();
    }
    if (can_free) free();
    set_freed();
}

// A use of a native object for the lifetime of the scope.
class use_scope {
  public:
    use_scope(use_gate & gate, use_mode mode) : gate_(gate), mode_(mode) { gate_.enter(mode_); }
    ~use_scope() { gate_.leave(mode_); }
    use_scope(const use_scope &) = delete;
    use_scope & operator=(const use_scope &) = delete;

  private:
    use_gate & gate_;
    use_mode   mode_;
};

// What the three handles share: the native object, its gate, and the kind of use calls take.
template <typename T>
class native_handle {
  public:
    native_handle(T * object, const char * what, use_mode mode) : object_(object), gate_(what), mode_(mode) {}
    native_handle(const native_handle &) = delete;
    native_handle & operator=(const native_handle &) = delete;

    // A use of the open object for the lifetime of this value; raises ValueError when it is closed.
    struct use {
        explicit use(native_handle & h) : scope(h.gate_, h.mode_), object(h.object_) {}
        use_scope scope;
        T *       object;
    };
    bool closed() const { return gate_.is_closed(); }

  protected:
    T *      object_;
    use_gate gate_;
    use_mode mode_;
};

// _core.Model. The weights are shared by the handle and every context made from it: closing the
// model drops the handle's share, so the weights go when its last context closes too. Its uses
// are shared: any number of threads tokenize and make contexts at once.
class ModelHandle : public native_handle<dm_model> {
  public:
    explicit ModelHandle(dm_model * model)
        : native_handle(model, "model", use_mode::shared), weights_(model, dm_model_free) {}
    ~ModelHandle();
    const std::shared_ptr<dm_model> & weights() const { return weights_; }   // during a use only
    void close();

  private:
    std::shared_ptr<dm_model> weights_;
};

// _core.Context: one dm_context and a share of its model's weights; calls on it run one at a time.
class ContextHandle : public native_handle<dm_context> {
  public:
    ContextHandle(dm_context * ctx, std::shared_ptr<dm_model> weights);
    ~ContextHandle();
    // Raises the C API's error of a failed call; a call that close() aborted says so.
    void check(bool ok) const;
    void close();
    int32_t n_vocab() const { return n_vocab_; }

  private:
    static bool abort_requested(void * self);
    void free_native();

    std::shared_ptr<dm_model> weights_;
    int32_t                   n_vocab_;
    std::atomic<bool>         aborting_{false};   // set by close(), read by the decode it aborts
};

// _core.Sampler: one dm_sampler; calls on it run one at a time.
class SamplerHandle : public native_handle<dm_sampler> {
  public:
    explicit SamplerHandle(dm_sampler * s) : native_handle(s, "sampler", use_mode::exclusive) {}
    ~SamplerHandle();
    void close();
};

// One use among several that a call takes together: the handle's address and how to take it.
struct pending_use {
    const void *          handle;
    std::function<void()> take;
};
// Takes the uses in one global order (by address), so that two threads taking overlapping sets
// cannot wait for each other. A handle listed twice raises ValueError(twice(i, j)), with i > j its
// two positions in the list, before any use is taken.
void take_in_address_order(std::vector<pending_use> uses, const std::function<std::string(size_t, size_t)> & twice);

// A binding that runs get(model) under a shared use of the open model.
template <typename Get>
auto with_model(Get get) {
    return [get](ModelHandle & self) {
        ModelHandle::use u(self);
        return get(u.object);
    };
}
