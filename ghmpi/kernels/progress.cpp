// MPI progress from a native thread: MPI_Iprobe on a communicator every interval, until stopped.
//
// The Python progress thread (ghmpi.comm.transport.ProgressThread) takes the GIL at every probe:
// the rank's main thread then waits for it each time it comes back from a torch op or an MPI
// call that released the GIL, dozens of times a message. This thread never touches Python.
// MPI is not linked here: the caller passes MPI_Iprobe's address (from the MPI library already
// loaded by mpi4py) and the communicator's handle, so one build serves every MPI. A handle is a
// pointer (Open MPI) or an int (MPICH): passed as intptr_t, both reach MPI_Iprobe in the same
// register. The status goes to a buffer larger than any MPI_Status.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace {
typedef int (*iprobe_fn)(int, int, intptr_t, int*, void*);
std::atomic<bool> stop_flag{false};
std::thread* worker = nullptr;
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

}  // extern "C"
