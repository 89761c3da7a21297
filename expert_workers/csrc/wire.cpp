// The data plane's wire format (expert_workers/wire.py) in C++: one op per message end, the GIL released.
//
// A decode step sends every MoE layer's tokens to each expert worker and waits for the replies, so the
// few microseconds of Python a message costs in Python's socket calls (header packing, a memoryview per
// tensor, frombuffer per received tensor) are paid per layer on both ends, on the step's critical path:
// on a 2-core machine they were most of a layer's dispatch overhead at one sequence (docs/data-plane.md).
// These ops read and write the same bytes as wire.py's Python functions, which stay as the fallback where
// this file cannot be built; tests/expert_workers/test_wire.py runs each end of one against the other.
//
// Sockets come as file descriptors. A Python socket with a timeout is non-blocking underneath, so every
// read and write here waits in poll() for at most `timeout` seconds (negative: no limit). Failures are
// raised as c10::Error whose message starts with a kind the Python side maps to its exception classes:
//   "wire-closed:"   the peer closed the connection (WireError)
//   "wire-timeout:"  no progress within the timeout (TimeoutError)
//   "wire-protocol:" the bytes are not our protocol, or not the reply expected (ProtocolError)
//   "wire-os:"       the OS failed the call (OSError, with errno)
//
// Threads: each op runs on the calling thread, which owns the connection for the op's duration (the
// dispatcher's engine thread on a router, a connection's thread on a worker).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <sys/uio.h>
#include <tuple>
#include <vector>

namespace {

constexpr char kMagicReq[4] = {'M', 'S', 'R', 'Q'};
constexpr char kMagicRsp[4] = {'M', 'S', 'R', 'P'};
constexpr int64_t kReqHeader = 21;  // magic, layer, T, P, H (int32 each), dtype code (uint8): wire.REQ
constexpr int64_t kRspHeader = 17;  // magic, status, T, H (int32 each), dtype code (uint8): wire.RSP

int8_t code_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "wire-protocol: no wire code for dtype ", t);
  }
}

at::ScalarType dtype_of(int8_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kBFloat16;
    case 2: return at::kHalf;
    default: TORCH_CHECK(false, "wire-protocol: unknown dtype code ", int(code));
  }
}

// Waits until fd is ready for `events`, at most timeout seconds (< 0: no limit).
void wait_ready(int fd, short events, double timeout) {
  pollfd p{fd, events, 0};
  const int ms = timeout < 0 ? -1 : int(timeout * 1000.0 + 0.5);
  for (;;) {
    const int r = poll(&p, 1, ms);
    if (r > 0) return;
    if (r == 0) TORCH_CHECK(false, "wire-timeout: no progress on the connection for ", timeout, " s");
    if (errno != EINTR) TORCH_CHECK(false, "wire-os:", errno, ": poll: ", std::strerror(errno));
  }
}

// Writes every byte of the parts, in order, with as few syscalls as the socket's buffer allows.
void send_all(int fd, iovec* iov, int n, double timeout) {
  while (n > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    const ssize_t k = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_ready(fd, POLLOUT, timeout);
        continue;
      }
      if (errno == EINTR) continue;
      TORCH_CHECK(false, "wire-os:", errno, ": send: ", std::strerror(errno));
    }
    size_t left = size_t(k);
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
}

void recv_all(int fd, void* buf, int64_t n, double timeout) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t k = recv(fd, p, size_t(n), 0);
    if (k > 0) {
      p += k;
      n -= k;
    } else if (k == 0) {
      TORCH_CHECK(false, "wire-closed: connection closed by peer");
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_ready(fd, POLLIN, timeout);
    } else if (errno != EINTR) {
      TORCH_CHECK(false, "wire-os:", errno, ": recv: ", std::strerror(errno));
    }
  }
}

int32_t read_i32(const char* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void write_i32(char* p, int64_t v) {
  const int32_t x = int32_t(v);
  std::memcpy(p, &x, 4);
}

iovec part(const at::Tensor& t) { return {const_cast<void*>(t.data_ptr()), size_t(t.nbytes())}; }

// Router -> worker. hidden [T, H] on the CPU; token (row index into hidden), expert, weight [P]: sent as
// int32, int32 and hidden's dtype (converted here if they are not).
void send_request(int64_t fd, double timeout, int64_t layer, const at::Tensor& hidden_in, const at::Tensor& token_in,
                  const at::Tensor& expert_in, const at::Tensor& weight_in) {
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.device().is_cpu(), "send_request: hidden must be [T, H] on the CPU");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor token = token_in.to(at::kInt).contiguous();
  const at::Tensor expert = expert_in.to(at::kInt).contiguous();
  const at::Tensor weight = weight_in.to(hidden.scalar_type()).contiguous();
  char header[kReqHeader];
  std::memcpy(header, kMagicReq, 4);
  write_i32(header + 4, layer);
  write_i32(header + 8, hidden.size(0));
  write_i32(header + 12, token.numel());
  write_i32(header + 16, hidden.size(1));
  header[20] = char(code_of(hidden.scalar_type()));
  iovec iov[5] = {{header, size_t(kReqHeader)}, part(token), part(expert), part(hidden), part(weight)};
  at::Tensor keep[4] = {hidden, token, expert, weight};  // alive until sent
  (void)keep;
  send_all(int(fd), iov, 5, timeout);
}

// Worker: the next request, received into `buffer` (uint8, grown when too small: the buffer returned is the
// one to pass next time). Returns (layer, hidden [T, H], token [P] int32, expert [P] int32, weight [P], buffer);
// the tensors are views of the buffer, valid until the next receive into it.
std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recv_request(
    int64_t fd, double timeout, at::Tensor buffer) {
  char header[kReqHeader];
  recv_all(int(fd), header, kReqHeader, timeout);
  TORCH_CHECK(std::memcmp(header, kMagicReq, 4) == 0, "wire-protocol: bad request header magic");
  const int64_t layer = read_i32(header + 4), T = read_i32(header + 8), P = read_i32(header + 12),
                H = read_i32(header + 16);
  TORCH_CHECK(T >= 0 && P >= 0 && H >= 0, "wire-protocol: negative size in request header");
  const at::ScalarType dtype = dtype_of(int8_t(header[20]));
  const int64_t esize = c10::elementSize(dtype);
  // int32 fields first: each tensor starts at a multiple of its element size.
  const int64_t n = 8 * P + (T * H + P) * esize;
  if (buffer.numel() < n) buffer = at::empty({std::max<int64_t>(n, 2 * buffer.numel())}, at::kByte);
  recv_all(int(fd), buffer.data_ptr(), n, timeout);
  const at::Tensor ids = buffer.narrow(0, 0, 8 * P).view(at::kInt);  // [2P]: token, then expert
  const at::Tensor values = buffer.narrow(0, 8 * P, (T * H + P) * esize).view(dtype);  // [T H + P]
  return {layer, values.narrow(0, 0, T * H).view({T, H}), ids.narrow(0, 0, P), ids.narrow(0, P, P),
          values.narrow(0, T * H, P), buffer};
}

// Worker -> router: out [T, H] on the CPU.
void send_response(int64_t fd, double timeout, const at::Tensor& out_in) {
  TORCH_CHECK(out_in.dim() == 2 && out_in.device().is_cpu(), "send_response: out must be [T, H] on the CPU");
  const at::Tensor out = out_in.contiguous();
  char header[kRspHeader];
  std::memcpy(header, kMagicRsp, 4);
  write_i32(header + 4, 0);
  write_i32(header + 8, out.size(0));
  write_i32(header + 12, out.size(1));
  header[16] = char(code_of(out.scalar_type()));
  iovec iov[2] = {{header, size_t(kRspHeader)}, part(out)};
  send_all(int(fd), iov, 2, timeout);
}

// Router: the reply to the request in flight, received straight into out [T, H] (contiguous, on the CPU, of
// the request's shape and dtype). Returns "" once out holds it, or the worker's error message when it
// answered with one (the connection keeps serving either way).
std::string recv_response(int64_t fd, double timeout, const at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu() && out.dim() == 2,
              "recv_response: out must be a contiguous [T, H] CPU tensor");
  char header[kRspHeader];
  recv_all(int(fd), header, kRspHeader, timeout);
  TORCH_CHECK(std::memcmp(header, kMagicRsp, 4) == 0, "wire-protocol: bad response magic");
  const int32_t status = read_i32(header + 4), T = read_i32(header + 8), H = read_i32(header + 12);
  if (status != 0) {
    std::string message(size_t(std::max(T, 0)), '\0');
    recv_all(int(fd), message.data(), int64_t(message.size()), timeout);
    return message.empty() ? std::string("expert worker error") : message;
  }
  const at::ScalarType dtype = dtype_of(int8_t(header[16]));
  // The stream still holds the reply's bytes after a mismatch: the caller drops the connection.
  TORCH_CHECK(T == out.size(0) && H == out.size(1) && dtype == out.scalar_type(), "wire-protocol: reply of [", T,
              ", ", H, "] ", dtype, " for a request of ", out.sizes(), " ", out.scalar_type());
  recv_all(int(fd), out.data_ptr(), out.nbytes(), timeout);
  return std::string();
}

// What a failed message end reports in a batch op: the kind-prefixed message of the error it raised.
std::string failure(const c10::Error& e) { return e.what_without_backtrace(); }

// Router: one layer's requests, one per connection, sent back to back with no Python between them (the first
// worker woken cannot delay the others' requests by more than the sends themselves). Returns per request ""
// once sent, else the failure ("wire-...: ..."); a failed send does not stop the others.
std::vector<std::string> send_requests(const std::vector<int64_t>& fds, double timeout, int64_t layer,
                                       const std::vector<at::Tensor>& hidden, const std::vector<at::Tensor>& token,
                                       const std::vector<at::Tensor>& expert, const std::vector<at::Tensor>& weight) {
  const size_t n = fds.size();
  TORCH_CHECK(hidden.size() == n && token.size() == n && expert.size() == n && weight.size() == n,
              "send_requests: one hidden, token, expert and weight per connection");
  std::vector<std::string> out(n);
  for (size_t i = 0; i < n; ++i) {
    try {
      send_request(fds[i], timeout, layer, hidden[i], token[i], expert[i], weight[i]);
    } catch (const c10::Error& e) {
      out[i] = failure(e);
    }
  }
  return out;
}

// Router: the replies to the requests in flight on these connections, each received straight into its out
// (as recv_response), in whatever order they arrive: one poll() over every connection still owed bytes.
// Returns per connection "" once its out holds the reply, "worker:" + the message of a worker's error reply
// (that connection keeps serving), or the failure ("wire-...: ..."; that connection is unusable). With no
// progress on any connection for `timeout` seconds, those still owed fail with a timeout.
std::vector<std::string> recv_responses(const std::vector<int64_t>& fds, double timeout,
                                        const std::vector<at::Tensor>& outs) {
  const size_t n = fds.size();
  TORCH_CHECK(outs.size() == n, "recv_responses: one out per connection");
  struct Pending {
    char header[kRspHeader];
    char* at;          // where the next bytes go
    int64_t left;      // bytes still owed in this part
    int part = 0;      // 0 header, 1 out, 2 error message
    std::string message;
  };
  std::vector<std::string> result(n);
  std::vector<Pending> state(n);
  std::vector<size_t> open;  // indices still owed bytes
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& out = outs[i];
    if (fds[i] < 0) {
      result[i] = "wire-os:" + std::to_string(EBADF) + ": recv: " + std::strerror(EBADF);
      continue;
    }
    if (!(out.is_contiguous() && out.device().is_cpu() && out.dim() == 2)) {
      result[i] = "wire-protocol: recv_responses: out must be a contiguous [T, H] CPU tensor";
      continue;
    }
    state[i].at = state[i].header;
    state[i].left = kRspHeader;
    open.push_back(i);
  }
  const int ms = timeout < 0 ? -1 : int(timeout * 1000.0 + 0.5);
  std::vector<pollfd> polls;
  while (!open.empty()) {
    polls.clear();
    for (size_t i : open) polls.push_back({int(fds[i]), POLLIN, 0});
    const int r = poll(polls.data(), polls.size(), ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const std::string why = r == 0 ? "wire-timeout: no progress on the connection for " + std::to_string(timeout) + " s"
                                     : "wire-os:" + std::to_string(errno) + ": poll: " + std::strerror(errno);
      for (size_t i : open) result[i] = why;
      break;
    }
    std::vector<size_t> still;
    for (size_t j = 0; j < open.size(); ++j) {
      const size_t i = open[j];
      Pending& p = state[i];
      bool done = false;
      if (polls[j].revents) {
        const ssize_t k = p.left > 0 ? recv(int(fds[i]), p.at, size_t(p.left), MSG_DONTWAIT) : 0;
        if (k > 0) {
          p.at += k;
          p.left -= k;
        } else if (p.left > 0 && k == 0) {
          result[i] = "wire-closed: connection closed by peer";
          done = true;
        } else if (p.left > 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          result[i] = "wire-os:" + std::to_string(errno) + ": recv: " + std::strerror(errno);
          done = true;
        }
        while (!done && p.left == 0) {  // a part is complete: on to the next (an empty part completes at once)
          if (p.part == 0) {
            const at::Tensor& out = outs[i];
            const int32_t status = read_i32(p.header + 4), T = read_i32(p.header + 8), H = read_i32(p.header + 12);
            if (std::memcmp(p.header, kMagicRsp, 4) != 0) {
              result[i] = "wire-protocol: bad response magic";
              done = true;
            } else if (status != 0) {
              p.part = 2;
              p.message.assign(size_t(std::max(T, 0)), '\0');
              p.at = p.message.data();
              p.left = int64_t(p.message.size());
            } else {
              const int8_t code = int8_t(p.header[16]);
              if (code < 0 || code > 2 || T != out.size(0) || H != out.size(1) || dtype_of(code) != out.scalar_type()) {
                result[i] = "wire-protocol: reply of [" + std::to_string(T) + ", " + std::to_string(H) +
                            "] for a request of a different shape or dtype";
                done = true;
              } else {
                p.part = 1;
                p.at = static_cast<char*>(out.data_ptr());
                p.left = int64_t(out.nbytes());
              }
            }
          } else {
            if (p.part == 2) result[i] = "worker:" + (p.message.empty() ? std::string("expert worker error") : p.message);
            done = true;
          }
        }
      }
      if (!done) still.push_back(i);
    }
    open.swap(still);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY(moe_serve_wire, m) {
  m.def("send_requests(int[] fds, float timeout, int layer, Tensor[] hidden, Tensor[] token, Tensor[] expert, "
        "Tensor[] weight) -> str[]", &send_requests);
  m.def("recv_responses(int[] fds, float timeout, Tensor[] outs) -> str[]", &recv_responses);
  m.def("send_request(int fd, float timeout, int layer, Tensor hidden, Tensor token, Tensor expert, Tensor weight) -> ()",
        &send_request);
  m.def("recv_request(int fd, float timeout, Tensor buffer) -> (int, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &recv_request);
  m.def("send_response(int fd, float timeout, Tensor out) -> ()", &send_response);
  m.def("recv_response(int fd, float timeout, Tensor out) -> str", &recv_response);
}
