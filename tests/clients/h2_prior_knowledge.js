// An independent HTTP/2 client (Node's nghttp2) that speaks HTTP/2 by prior knowledge over
// TLS WITHOUT ALPN, the way aioapns and Java's pushy connect to APNs.
// usage: node h2_prior_knowledge.js PORT CA_PEM REQUESTS_JSON
// REQUESTS_JSON: [{"method","path","headers":{},"body"}]; all go out at once on one
// connection; prints one JSON line per response: {"i","status","headers","body","alpn"}.
'use strict';
const http2 = require('http2');
const tls = require('tls');
const fs = require('fs');

const [port, caPath, requestsJson] = process.argv.slice(2);
const requests = JSON.parse(requestsJson);
let alpn = null;
const session = http2.connect(`https://localhost:${port}`, {
  createConnection: () => {
    const socket = tls.connect({ host: 'localhost', port: Number(port), servername: 'localhost',
                                 ca: fs.readFileSync(caPath), minVersion: 'TLSv1.3' });
    socket.on('secureConnect', () => { alpn = socket.alpnProtocol || null; });
    return socket;
  },
});
session.on('error', (err) => { console.error(String(err)); process.exit(3); });
let left = requests.length;
requests.forEach((r, i) => {
  const stream = session.request({ ':method': r.method || 'POST', ':path': r.path, ...(r.headers || {}) });
  const chunks = [];
  let head = {};
  stream.on('response', (h) => { head = h; });
  stream.on('data', (c) => chunks.push(c));
  stream.on('end', () => {
    const status = head[':status'];
    delete head[':status'];
    console.log(JSON.stringify({ i, status, headers: head, body: Buffer.concat(chunks).toString(), alpn }));
    if (--left === 0) session.close();
  });
  stream.on('error', (err) => { console.log(JSON.stringify({ i, error: String(err) })); if (--left === 0) session.close(); });
  if (r.body !== undefined) stream.end(r.body); else stream.end();
});
setTimeout(() => { console.error('timeout'); process.exit(4); }, 20000).unref();
