// Cross-check of tests/standins/fluentd.py against @fluent-org/logger (an independent implementation).
//   node cross.js server                       -> prints {"port":N}, then one JSON line per event received
//   node cross.js client <host> <port> <tag> <count> <mode>...  -> sends <count> events per mode, with acks
"use strict";
const { FluentClient, FluentServer, EventTime } = require("@fluent-org/logger");

function seconds(time) {
  return typeof time === "number" ? time : time.epoch + time.nano / 1e9;
}

async function serve() {
  const server = new FluentServer({ listenOptions: { host: "127.0.0.1", port: 0 } });
  server.on("entry", (tag, time, record) => {
    process.stdout.write(JSON.stringify({ tag, time: seconds(time), record }) + "\n");
  });
  await server.listen();
  process.stdout.write(JSON.stringify({ port: server.port }) + "\n");
  const stop = () => server.close().then(() => process.exit(0));
  process.stdin.on("end", stop);
  process.stdin.resume();
  process.on("SIGTERM", stop);
}

async function send(host, port, tag, count, modes) {
  for (const mode of modes) {
    const client = new FluentClient(tag, {
      eventMode: mode,
      socket: { host, port: Number(port) },
      ack: { ackTimeout: 5000 },
    });
    const sent = [];
    for (let i = 0; i < Number(count); i++) {
      sent.push(client.emit(mode, { mode, i, text: "héllo" }, new EventTime(1700000000 + i, 250000000)));
    }
    await Promise.all(sent);  // resolves only when the receiver acknowledged the chunk
    await client.shutdown();
  }
}

// A pending promise does not keep node alive: fail unless the work really finished.
process.exitCode = 1;
const [command, ...args] = process.argv.slice(2);
const run = command === "server" ? serve() : send(...args.slice(0, 4), args.slice(4));
run.then(() => { process.exitCode = 0; }).catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
