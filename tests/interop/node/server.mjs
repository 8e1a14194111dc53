// A stock tus server (@tus/server + @tus/file-store) for staging-cli's interoperability tests.
//
//   node server.mjs DIRECTORY [PORT]
//
// Stores uploads under DIRECTORY (the upload's bytes in DIRECTORY/<id>, its info in
// DIRECTORY/<id>.json), serves tus at /uploads on 127.0.0.1:PORT (0 or absent: any free
// port) and prints exactly one line `listening on http://127.0.0.1:PORT` to stdout once it
// accepts connections. Every response is logged to stderr as `METHOD URL -> STATUS`.
// Env TUS_MAX_SIZE (bytes), when set, becomes the server's maxSize (Tus-Max-Size, 413).
// Env TUS_EXIT_ON_STDIN_EOF=1: exit when stdin closes, so a test runner that dies without
// its cleanup (SIGKILL, a hard timeout) cannot leave this server running.
// Nothing here is specific to staging-cli: it is the README's standalone server.
import http from "node:http";
import process from "node:process";

import { FileStore } from "@tus/file-store";
import { Server } from "@tus/server";

const [directory, rawPort = "0"] = process.argv.slice(2);
if (!directory) {
  process.stderr.write("usage: node server.mjs DIRECTORY [PORT]\n");
  process.exit(2);
}
const port = Number.parseInt(rawPort, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`not a port: ${rawPort}\n`);
  process.exit(2);
}

const maxSize = process.env.TUS_MAX_SIZE ? Number.parseInt(process.env.TUS_MAX_SIZE, 10) : undefined;

const tus = new Server({
  path: "/uploads",
  datastore: new FileStore({ directory }),
  ...(maxSize ? { maxSize } : {}),
});

const httpServer = http.createServer((req, res) => {
  // Logged as the status line goes out (stderr to a file is synchronous in Node.js), so the line
  // is on disk before the client can have read the response.
  const writeHead = res.writeHead;
  res.writeHead = function (status, ...rest) {
    process.stderr.write(`${req.method} ${req.url} -> ${status}\n`);
    return writeHead.call(this, status, ...rest);
  };
  res.on("close", () => {
    if (!res.headersSent) {
      process.stderr.write(`${req.method} ${req.url} -> (closed without a response)\n`);
    }
  });
  tus.handle(req, res).catch((error) => {
    process.stderr.write(`handler failed: ${error?.stack ?? error}\n`);
    if (!res.headersSent) {
      res.statusCode = 500;
    }
    res.end();
  });
});

httpServer.on("error", (error) => {
  process.stderr.write(`server error: ${error?.stack ?? error}\n`);
  process.exit(1);
});

httpServer.listen({ host: "127.0.0.1", port }, () => {
  const { port: bound } = httpServer.address();
  process.stdout.write(`listening on http://127.0.0.1:${bound}\n`);
});

function shutdown() {
  httpServer.close();
  httpServer.closeAllConnections();
  process.exit(0);
}

if (process.env.TUS_EXIT_ON_STDIN_EOF === "1") {
  process.stdin.on("end", shutdown);
  process.stdin.on("error", shutdown);
  process.stdin.resume();
}

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, shutdown);
}
