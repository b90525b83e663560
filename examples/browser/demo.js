// The demo page's behaviour: every protocol detail lives in ksw1.js.
import { Client, Feature, withTimeout } from './ksw1.js';

const MiB = 1024 * 1024;
const FRAME = 256 * 1024; // the echo is sent as Data frames of this size
const TIMEOUT_MS = 30_000;
const $ = (id) => document.getElementById(id);
let client = null;

function show(id, text, ok) {
  $(id).textContent = text;
  $(id).dataset.ok = String(ok);
}

function randomBytes(size) {
  const bytes = new Uint8Array(size);
  for (let at = 0; at < size; at += 65536) { // getRandomValues fills at most 64 KiB a call
    crypto.getRandomValues(bytes.subarray(at, at + 65536));
  }
  return bytes;
}

// One handler per form: prevent the page load, run `action`, show what it says or its error.
function onSubmit(form, output, action) {
  $(form).addEventListener('submit', async (event) => {
    event.preventDefault();
    show(output, 'working…', '');
    try {
      show(output, await action(), true);
    } catch (error) {
      show(output, error.message, false);
    }
  });
}

onSubmit('connect-form', 'status', async () => {
  client?.close();
  $('session').hidden = true;
  try {
    client = await Client.connect($('url').value, { token: $('token').value });
  } catch (error) {
    throw new Error(`${error.message}. A refused handshake (wrong token, page origin not ` +
      'allowed) looks like this to a page; the browser console shows the HTTP status.');
  }
  const connected = client;
  connected.closed.then((code) => {
    if (client === connected) show('status', `WebSocket closed (code ${code})`, false);
  });
  const features = Object.keys(Feature).filter((name) => client.features & Feature[name]);
  const info = {
    features: `${features.join(', ') || 'none'} (0x${client.features.toString(16)})`,
    'max streams': client.maxStreams,
    'max payload': client.maxPayload ? `${client.maxPayload / MiB} MiB` : 'not announced',
    subprotocol: client.subprotocol || 'none',
  };
  $('info').replaceChildren(...Object.entries(info).flatMap(([name, value]) => {
    const [dt, dd] = [document.createElement('dt'), document.createElement('dd')];
    dt.textContent = name;
    dd.textContent = value;
    return [dt, dd];
  }));
  $('session').hidden = false;
  return `connected to ${$('url').value}`;
});

onSubmit('echo-form', 'echo-result', async () => {
  const target = $('target').value;
  const colon = target.lastIndexOf(':');
  const host = target.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  const port = Number(target.slice(colon + 1));
  const sent = randomBytes(Number($('mib').value) * MiB);
  const stream = await withTimeout(client.openTcp(host, port), TIMEOUT_MS, 'open');
  try {
    const started = performance.now();
    const back = stream.readExactly(sent.byteLength); // read while we write
    for (let at = 0; at < sent.byteLength; at += FRAME) stream.write(sent.subarray(at, at + FRAME));
    const echoed = await withTimeout(back, TIMEOUT_MS, 'echo');
    const seconds = (performance.now() - started) / 1000;
    if (!echoed.every((value, i) => value === sent[i])) throw new Error('the echo differs from what was sent');
    return `${sent.byteLength / MiB} MiB sent to ${target} and echoed back intact in ` +
      `${(seconds * 1000).toFixed(0)} ms: ${(sent.byteLength / MiB / seconds).toFixed(1)} MiB/s each way`;
  } finally {
    stream.close();
  }
});

onSubmit('dns-form', 'dns-result', async () => {
  const addresses = await withTimeout(client.resolve($('name').value), TIMEOUT_MS, 'DNS');
  return `${$('name').value} → ${addresses.join(', ')}`;
});
