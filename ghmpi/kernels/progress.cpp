// MPI progress from a native thread: MPI_Iprobe on a communicator every interval, until stopped;
// and, where the caller asks, receiving ahead: the next messages of a communicator taken off the
// wire (matched probe, nonblocking receive) into buffers the caller lends, while it computes.
//
// The Python progress thread (ghmpi.comm.transport.ProgressThread) takes the GIL at every probe:
// the rank's main thread then waits for it each time it comes back from a torch op or an MPI
// call that released the GIL, dozens of times a message. This thread never touches Python.
// MPI is not linked here: the caller passes the functions' addresses (from the MPI library
// already loaded by mpi4py), the handles, and where MPI_Status keeps the source and the tag, so
// one build serves every MPI. A handle is a pointer (Open MPI) or an int (MPICH): passed as
// intptr_t, both reach MPI in the same register. Statuses, messages and requests live in buffers
// larger than any MPI's.
//
// Receiving ahead (ghmpi_inbox_*): a message larger than the eager limit moves only once its
// receive is posted, and without single copy (CMA) only while one side is inside MPI. A rank that
// posts the next receive only when it comes back from its kernel then waits for the bytes; here
// the thread posts it as soon as the envelope arrives, and its probes move the bytes during the
// kernel. The caller takes the messages in arrival order (ghmpi_inbox_take); every receive on the
// communicator must go through here while the inbox is open, so the order holds. One lock guards
// the inbox: the thread's pumping and the caller's calls never overlap.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace {
typedef int (*iprobe_fn)(int, int, intptr_t, int*, void*);
typedef int (*improbe_fn)(int, int, intptr_t, int*, void*, void*);
typedef int (*imrecv_fn)(void*, int, intptr_t, void*, void*);
typedef int (*test_fn)(void*, int*, void*);
typedef int (*get_count_fn)(const void*, intptr_t, int*);

std::atomic<bool> stop_flag{false};
std::thread* worker = nullptr;

struct Handle {  // an MPI_Message or MPI_Request, whatever its size
  alignas(16) char bytes[64];
};

struct Entry {  // a message received ahead: its buffer, size, envelope, receive
  int64_t buf, n;
  int source, tag;
  Handle req;
  bool done;
};

struct Lent {  // a buffer the caller lent
  char* p;
  int64_t cap;
  bool busy;  // a receive is in it, or the caller holds it
  bool retired;
};

struct Inbox {
  std::mutex mu;
  bool open = false;
  improbe_fn improbe = nullptr;
  imrecv_fn imrecv = nullptr;
  test_fn test = nullptr;
  get_count_fn get_count = nullptr;
  intptr_t comm = 0, byte = 0;
  int any_source = -1, any_tag = -1, src_off = 0, tag_off = 4, ahead_max = 2;
  std::deque<Entry> ahead;
  std::vector<Lent> lent;
  bool held = false;  // a matched message waits for a buffer that fits
  Handle msg;
  int64_t held_n = 0;
  int held_source = 0, held_tag = 0;
  int error = 0;  // an MPI call failed: its code

  int field(const char* status, int off) {
    int v;
    std::memcpy(&v, status + off, sizeof v);
    return v;
  }

  // Under the lock: complete what has arrived; take the next envelopes off the wire.
  void pump() {
    alignas(16) char status[256];
    for (Entry& e : ahead) {
      if (e.done) continue;
      int flag = 0;
      if (int rc = test(e.req.bytes, &flag, status)) error = rc;
      if (flag) e.done = true;
    }
    while (static_cast<int>(ahead.size()) < ahead_max && !error) {
      if (!held) {
        int flag = 0, n = 0;
        if (int rc = improbe(any_source, any_tag, comm, &flag, msg.bytes, status)) { error = rc; return; }
        if (!flag) return;
        if (int rc = get_count(status, byte, &n)) { error = rc; return; }
        held = true;
        held_n = n;
        held_source = field(status, src_off);
        held_tag = field(status, tag_off);
      }
      int64_t best = -1;  // the smallest free buffer that fits
      for (size_t i = 0; i < lent.size(); ++i) {
        const Lent& b = lent[i];
        if (!b.busy && !b.retired && b.cap >= held_n && (best < 0 || b.cap < lent[best].cap))
          best = static_cast<int64_t>(i);
      }
      if (best < 0) return;  // the caller lends one (ghmpi_inbox_take says how large)
      Entry e{best, held_n, held_source, held_tag, {}, false};
      if (int rc = imrecv(lent[best].p, static_cast<int>(held_n), byte, msg.bytes, e.req.bytes)) {
        error = rc;
        return;
      }
      lent[best].busy = true;
      held = false;
      ahead.push_back(e);
    }
  }
};

Inbox inbox;
}  // namespace

extern "C" {

// Starts the thread (0), or returns 1 if one runs already.
int ghmpi_progress_start(void* iprobe, intptr_t comm, int source, int tag, int64_t interval_ns) {
  if (worker != nullptr) return 1;
  stop_flag.store(false);
  const iprobe_fn f = reinterpret_cast<iprobe_fn>(iprobe);
  worker = new std::thread([=] {
    int flag = 0;
    alignas(16) char status[256];
    while (!stop_flag.load(std::memory_order_relaxed)) {
      f(source, tag, comm, &flag, status);
      {
        std::lock_guard<std::mutex> g(inbox.mu);
        if (inbox.open) inbox.pump();
      }
      std::this_thread::sleep_for(std::chrono::nanoseconds(interval_ns));
    }
  });
  return 0;
}

void ghmpi_progress_stop() {
  if (worker == nullptr) return;
  stop_flag.store(true);
  worker->join();
  delete worker;
  worker = nullptr;
}

// Opens the inbox on `comm` (0), or returns 1 if it is open already. `ahead`: messages received
// ahead at most; src_off, tag_off: byte offsets of MPI_SOURCE and MPI_TAG in MPI_Status.
int ghmpi_inbox_open(void* improbe, void* imrecv, void* test, void* get_count, intptr_t comm,
                     intptr_t byte, int any_source, int any_tag, int src_off, int tag_off,
                     int ahead) {
  std::lock_guard<std::mutex> g(inbox.mu);
  if (inbox.open) return 1;
  inbox.improbe = reinterpret_cast<improbe_fn>(improbe);
  inbox.imrecv = reinterpret_cast<imrecv_fn>(imrecv);
  inbox.test = reinterpret_cast<test_fn>(test);
  inbox.get_count = reinterpret_cast<get_count_fn>(get_count);
  inbox.comm = comm;
  inbox.byte = byte;
  inbox.any_source = any_source;
  inbox.any_tag = any_tag;
  inbox.src_off = src_off;
  inbox.tag_off = tag_off;
  inbox.ahead_max = ahead < 1 ? 1 : ahead;
  inbox.ahead.clear();
  inbox.lent.clear();
  inbox.held = false;
  inbox.error = 0;
  inbox.open = true;
  return 0;
}

// Closes the inbox; returns the messages it had taken off the wire that the caller has not
// taken (received, in flight, or matched and waiting for a buffer): 0 unless the caller stopped
// early. Their receives are left as they are.
int64_t ghmpi_inbox_close() {
  std::lock_guard<std::mutex> g(inbox.mu);
  if (!inbox.open) return 0;
  inbox.open = false;
  const int64_t left = static_cast<int64_t>(inbox.ahead.size()) + (inbox.held ? 1 : 0);
  inbox.ahead.clear();
  inbox.lent.clear();
  inbox.held = false;
  return left;
}

// Lends a buffer of `cap` bytes to receive into; returns its id.
int64_t ghmpi_inbox_lend(void* p, int64_t cap) {
  std::lock_guard<std::mutex> g(inbox.mu);
  inbox.lent.push_back({static_cast<char*>(p), cap, false, false});
  return static_cast<int64_t>(inbox.lent.size()) - 1;
}

// Retires free buffers smaller than `cap` (a larger one has been lent in their place): writes
// their ids to `ids` (room for `room`), returns how many.
int64_t ghmpi_inbox_retire_below(int64_t cap, int64_t* ids, int64_t room) {
  std::lock_guard<std::mutex> g(inbox.mu);
  int64_t n = 0;
  for (size_t i = 0; i < inbox.lent.size() && n < room; ++i) {
    Lent& b = inbox.lent[i];
    if (!b.busy && !b.retired && b.cap < cap) {
      b.retired = true;
      ids[n++] = static_cast<int64_t>(i);
    }
  }
  return n;
}

// The next message in arrival order: 1 with out = (buffer id, bytes, source, tag) once it has
// arrived (once its envelope is in, this waits for its bytes); 0 when none is in yet; 2 when the
// next one waits for a buffer of out[1] bytes (lend one, take again); a negative MPI error code
// when a call failed. The buffer stays the caller's until ghmpi_inbox_release.
int ghmpi_inbox_take(int64_t* out) {
  std::lock_guard<std::mutex> g(inbox.mu);
  if (!inbox.open) return 0;
  inbox.pump();
  while (!inbox.error && !inbox.ahead.empty() && !inbox.ahead.front().done) {
    alignas(16) char status[256];
    int flag = 0;
    if (int rc = inbox.test(inbox.ahead.front().req.bytes, &flag, status)) inbox.error = rc;
    if (flag) inbox.ahead.front().done = true;
  }
  if (inbox.error) return -(inbox.error > 0 ? inbox.error : 1);
  if (inbox.ahead.empty() || !inbox.ahead.front().done) {
    if (inbox.ahead.empty() && inbox.held) {
      out[1] = inbox.held_n;
      return 2;
    }
    return 0;
  }
  const Entry e = inbox.ahead.front();
  inbox.ahead.pop_front();
  out[0] = e.buf;
  out[1] = e.n;
  out[2] = e.source;
  out[3] = e.tag;
  inbox.pump();  // the next one may start now
  return 1;
}

// The caller has finished with buffer `id`: it may be received into again.
void ghmpi_inbox_release(int64_t id) {
  std::lock_guard<std::mutex> g(inbox.mu);
  if (id >= 0 && id < static_cast<int64_t>(inbox.lent.size())) inbox.lent[id].busy = false;
}

}  // extern "C"
