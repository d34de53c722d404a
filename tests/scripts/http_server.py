"""A real HTTP/1.1 server with keep-alive, for the gate's tests: it counts the requests it
serves, one line each on stdout ("served N PATH"), so a test counts calls at the server.

usage: http_server.py ADDRESS   (127.0.0.1, ::1); prints "listening PORT" once bound.
"""
import http.server
import socket
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0

    def do_GET(self):
        Handler.served += 1
        # Counted before the reply leaves: the client cannot finish before the count is out.
        print(f"served {Handler.served} {self.path}", flush=True)
        body = f"response {Handler.served}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    daemon_threads = True


server = Server((sys.argv[1], 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
