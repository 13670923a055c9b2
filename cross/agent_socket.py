"""HTTP over an agent's Unix socket, for the cross/ scripts' checks
(check-digits.py, check-models.py, ssh-flash-test)."""
import http.client
import socket


class Unix(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("agent", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def request(path, method, url, body=None, headers=None, timeout=120):
    """One request on a fresh connection: (status, headers, body)."""
    c = Unix(path, timeout)
    c.request(method, url, body, headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data
