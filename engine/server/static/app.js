// The vivace web page: asks the server for music, plays it while it streams, draws its spectrogram and saves it
// as a WAV. Plain browser APIs only: the page works offline against the server that served it.
"use strict";

const PLAYBACK_MARGIN_S = 0.1; // a buffer started exactly at currentTime starts late and clicks
const FFT_SIZE = 512;
const HOP = 256; // half the window: a Hann window's frames overlap-add to a flat gain
const BINS = FFT_SIZE / 2; // DC up to just below Nyquist, one canvas row each
const MIN_DB = -90; // quieter than this is drawn as the background
const MAX_DB = 0; // a full-scale sine
const BACKGROUND = [11, 13, 18]; // style.css's --canvas-bg: what the test reads as "nothing drawn"

// What tests (and the curious) can read; kept current by setState and the stream loop.
const vivace = (window.vivace = {
  state: "idle",
  samplesReceived: 0,
  sampleRate: null,
  firstAudioSeconds: null,
  scheduledSources: 0,
  audioContextState: null,
  model: null,
});

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("form"), prompt: $("prompt"), duration: $("duration"), seed: $("seed"), apiKey: $("api-key"),
  generate: $("generate"), download: $("download"), error: $("error"), status: $("status"),
  firstAudio: $("first-audio"), progress: $("progress"), model: $("model"), canvas: $("spectrogram"),
};

let model = null; // the server's model card (GET /v1/models)
let modelRequest = null; // the models request in flight, shared by the page load and a Generate click
let wav = null; // {url, name} of the last complete clip

function setState(state) {
  vivace.state = state;
  document.body.dataset.state = state;
}

function showError(message) {
  ui.error.textContent = message || "";
  ui.error.hidden = !message;
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A non-2xx answer as an Error carrying the server's own message (OpenAI's error shape), or the HTTP status when
// the body is not that shape (a proxy's error page, say).
async function apiError(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: the status line is all there is
  }
  return new Error(message);
}

// ---- the model card ----------------------------------------------------------------------------------------------

function loadModel() {
  if (!modelRequest) {
    modelRequest = fetchModel().finally(() => { modelRequest = null; });
  }
  return modelRequest;
}

async function fetchModel() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) throw await apiError(response);
  const card = (await response.json()).data[0];
  if (!card) throw new Error("the server lists no model");
  model = card;
  vivace.model = card.id;
  vivace.sampleRate = card.sample_rate;
  ui.model.textContent = `${card.id} · ${card.sample_rate} Hz · up to ${card.max_duration_s} s`;
  ui.duration.max = String(card.max_duration_s);
  if (Number(ui.duration.value) > card.max_duration_s) ui.duration.value = String(card.max_duration_s);
  return card;
}

async function initialLoad() {
  setState("loading");
  try {
    await loadModel();
    ui.status.textContent = "ready";
    setState("idle");
  } catch (error) {
    // typically 401 before a key is entered: Generate asks again with the key
    showError(error.message);
    ui.status.textContent = "could not load the model list";
    setState("error");
  }
}

// ---- 16-bit PCM from a byte stream ---------------------------------------------------------------------------------

// Network chunks need not end on a sample boundary: an odd last byte waits for the next chunk.
function pcmDecoder() {
  let carried = null;
  return {
    decode(chunk) {
      let bytes = chunk;
      if (carried !== null) {
        bytes = new Uint8Array(chunk.length + 1);
        bytes[0] = carried;
        bytes.set(chunk, 1);
        carried = null;
      }
      const count = bytes.length >> 1;
      if (bytes.length & 1) carried = bytes[bytes.length - 1];
      // DataView: the stream is little-endian whatever this machine is
      const view = new DataView(bytes.buffer, bytes.byteOffset, count * 2);
      const samples = new Float32Array(count);
      for (let i = 0; i < count; i++) samples[i] = view.getInt16(2 * i, true) / 32768;
      return { bytes: bytes.subarray(0, count * 2), samples };
    },
    get midSample() { return carried !== null; },
  };
}

// ---- playback ------------------------------------------------------------------------------------------------------

const player = { context: null, nextStartTime: 0, sources: new Set() };

// Called synchronously in the click handler: browsers let a page start sound only from within a user gesture.
function startAudio() {
  if (!player.context) {
    player.context = new AudioContext();
    player.context.onstatechange = () => { vivace.audioContextState = player.context.state; };
  }
  player.context.resume().catch(() => {}); // a refusal leaves the state "suspended", which the page reports
  vivace.audioContextState = player.context.state;
  for (const source of player.sources) source.stop(); // a new clip replaces the one still playing
  player.sources.clear();
  player.nextStartTime = 0;
}

// Buffers are queued back to back on the context's clock, so the chunks play as one gapless clip; a chunk that
// arrives after the queue ran dry starts a margin ahead of now rather than in the past.
function play(samples, sampleRate) {
  const context = player.context;
  const buffer = context.createBuffer(1, samples.length, sampleRate);
  buffer.copyToChannel(samples, 0);
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  source.onended = () => player.sources.delete(source);
  player.nextStartTime = Math.max(player.nextStartTime, context.currentTime + PLAYBACK_MARGIN_S);
  source.start(player.nextStartTime);
  player.nextStartTime += buffer.duration;
  player.sources.add(source);
  vivace.scheduledSources += 1;
  vivace.audioContextState = context.state;
}

// ---- spectrogram ---------------------------------------------------------------------------------------------------

const fft = makeFft(FFT_SIZE);
const hann = Float32Array.from({ length: FFT_SIZE }, (_, i) => 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / FFT_SIZE));
const colours = colourTable();

// An in-place iterative radix-2 FFT with its bit-reversal order and twiddles computed once.
function makeFft(n) {
  const bits = Math.log2(n);
  const reversed = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    let r = 0;
    for (let b = 0; b < bits; b++) r |= ((i >> b) & 1) << (bits - 1 - b);
    reversed[i] = r;
  }
  const cos = Float32Array.from({ length: n / 2 }, (_, k) => Math.cos((-2 * Math.PI * k) / n));
  const sin = Float32Array.from({ length: n / 2 }, (_, k) => Math.sin((-2 * Math.PI * k) / n));
  return function transform(re, im) {
    for (let i = 0; i < n; i++) {
      const j = reversed[i];
      if (j > i) {
        [re[i], re[j]] = [re[j], re[i]];
        [im[i], im[j]] = [im[j], im[i]];
      }
    }
    for (let size = 2; size <= n; size *= 2) {
      const half = size / 2;
      const step = n / size;
      for (let start = 0; start < n; start += size) {
        for (let k = 0; k < half; k++) {
          const a = start + k;
          const b = a + half;
          const wr = cos[k * step];
          const wi = sin[k * step];
          const tr = re[b] * wr - im[b] * wi;
          const ti = re[b] * wi + im[b] * wr;
          re[b] = re[a] - tr;
          im[b] = im[a] - ti;
          re[a] += tr;
          im[a] += ti;
        }
      }
    }
  };
}

// 256 RGB colours from the background (silence) through violet and orange to pale yellow (loud).
function colourTable() {
  const stops = [
    [0, BACKGROUND], [0.3, [72, 18, 112]], [0.55, [186, 44, 96]], [0.8, [248, 138, 40]], [1, [252, 246, 186]],
  ];
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let s = 1;
    while (stops[s][0] < t) s++;
    const [t0, c0] = stops[s - 1];
    const [t1, c1] = stops[s];
    const f = (t - t0) / (t1 - t0);
    for (let c = 0; c < 3; c++) table[3 * i + c] = c0[c] + f * (c1[c] - c0[c]);
  }
  return table;
}

// Frames are drawn one column each into an offscreen canvas at frame resolution, which is then scaled onto the
// visible one: the picture fills left to right as the clip's expected length is received, whatever its length.
function spectrogram(canvas, expectedSamples) {
  const context = canvas.getContext("2d");
  const expectedFrames = Math.max(1, Math.floor((expectedSamples - FFT_SIZE) / HOP) + 1);
  let frames = document.createElement("canvas");
  frames.width = expectedFrames;
  frames.height = BINS;
  let drawn = 0;
  let pending = new Float32Array(0); // received samples not yet past a frame's hop
  const re = new Float32Array(FFT_SIZE);
  const im = new Float32Array(FFT_SIZE);
  const column = new ImageData(1, BINS);

  function clear() {
    context.fillStyle = `rgb(${BACKGROUND.join(",")})`;
    context.fillRect(0, 0, canvas.width, canvas.height);
  }

  function drawFrame(frame) {
    for (let i = 0; i < FFT_SIZE; i++) {
      re[i] = frame[i] * hann[i];
      im[i] = 0;
    }
    fft(re, im);
    const fullScale = FFT_SIZE / 4; // a full-scale sine's peak under a Hann window
    for (let bin = 0; bin < BINS; bin++) {
      const db = 20 * Math.log10(Math.hypot(re[bin], im[bin]) / fullScale + 1e-12);
      const level = Math.round(255 * Math.min(1, Math.max(0, (db - MIN_DB) / (MAX_DB - MIN_DB))));
      const pixel = 4 * (BINS - 1 - bin); // low frequencies at the bottom
      column.data.set(colours.subarray(3 * level, 3 * level + 3), pixel);
      column.data[pixel + 3] = 255;
    }
    if (drawn === frames.width) grow();
    frames.getContext("2d").putImageData(column, drawn, 0);
    drawn += 1;
  }

  // a clip longer than expected (the engine rounds to whole frames of its codec) widens the picture
  function grow() {
    const wider = document.createElement("canvas");
    wider.width = frames.width * 2;
    wider.height = BINS;
    wider.getContext("2d").drawImage(frames, 0, 0);
    frames = wider;
  }

  function render(total) {
    clear();
    if (drawn) context.drawImage(frames, 0, 0, drawn, BINS, 0, 0, (drawn / total) * canvas.width, canvas.height);
  }

  clear();
  return {
    add(samples) {
      const joined = new Float32Array(pending.length + samples.length);
      joined.set(pending);
      joined.set(samples, pending.length);
      let start = 0;
      for (; start + FFT_SIZE <= joined.length; start += HOP) drawFrame(joined.subarray(start, start + FFT_SIZE));
      pending = joined.slice(start);
      render(Math.max(expectedFrames, drawn));
    },
    // the clip's last samples, zero-padded to one more frame, and the picture stretched to the clip's true length
    finish() {
      const uncovered = drawn ? pending.length - (FFT_SIZE - HOP) : pending.length;
      if (uncovered > 0) {
        const last = new Float32Array(FFT_SIZE);
        last.set(pending);
        drawFrame(last);
      }
      render(Math.max(1, drawn));
    },
  };
}

// ---- WAV -----------------------------------------------------------------------------------------------------------

// A 44-byte RIFF header for 16-bit mono PCM, then the bytes exactly as the server sent them.
function wavBlob(chunks, sampleRate) {
  const dataBytes = chunks.reduce((sum, chunk) => sum + chunk.length, 0);
  const header = new DataView(new ArrayBuffer(44));
  const ascii = (offset, text) => [...text].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  header.setUint32(4, 36 + dataBytes, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  header.setUint32(16, 16, true); // the fmt chunk's size
  header.setUint16(20, 1, true); // integer PCM
  header.setUint16(22, 1, true); // one channel
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * 2, true); // bytes per second
  header.setUint16(32, 2, true); // bytes per sample frame
  header.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  header.setUint32(40, dataBytes, true);
  return new Blob([header.buffer, ...chunks], { type: "audio/wav" });
}

function download() {
  if (!wav) return;
  const link = document.createElement("a");
  link.href = wav.url;
  link.download = wav.name;
  document.body.appendChild(link);
  link.click();
  link.remove();
}

// ---- a generation --------------------------------------------------------------------------------------------------

function readRequest() {
  const durationText = ui.duration.value.trim();
  return {
    model: model.id,
    input: ui.prompt.value,
    response_format: "pcm",
    stream_format: "audio",
    // empty: the server's default length; anything else goes as typed, for the server to accept or explain
    duration: durationText === "" ? undefined : Number(durationText),
    seed: ui.seed.value.trim() === "" ? 0 : Number(ui.seed.value),
  };
}

function resetRun() {
  showError("");
  if (wav) URL.revokeObjectURL(wav.url);
  wav = null;
  ui.download.disabled = true;
  ui.progress.value = 0;
  ui.firstAudio.textContent = "";
  Object.assign(vivace, { samplesReceived: 0, firstAudioSeconds: null, scheduledSources: 0 });
}

// Reads the PCM stream to its end: each chunk is played, drawn and kept for the WAV as it arrives.
async function receive(response, request, sampleRate, clickedAt) {
  const expected = (request.duration ?? model.default_duration_s) * sampleRate;
  const picture = spectrogram(ui.canvas, expected);
  const decoder = pcmDecoder();
  const kept = [];
  const reader = response.body.getReader();
  const inSeconds = (samples) => (samples / sampleRate).toFixed(1);
  for (;;) {
    let result;
    try {
      result = await reader.read();
    } catch (error) {
      // the server breaks the connection when a generation fails mid-stream
      throw new Error(`the audio stream broke off after ${inSeconds(vivace.samplesReceived)} s (${error.message})`);
    }
    if (result.done) break;
    const { bytes, samples } = decoder.decode(result.value);
    if (!samples.length) continue;
    if (vivace.firstAudioSeconds === null) {
      vivace.firstAudioSeconds = (performance.now() - clickedAt) / 1000;
      ui.firstAudio.textContent = `time to first audio: ${vivace.firstAudioSeconds.toFixed(2)} s`;
    }
    kept.push(bytes);
    play(samples, sampleRate);
    picture.add(samples);
    vivace.samplesReceived += samples.length;
    ui.progress.value = Math.min(1, vivace.samplesReceived / expected);
    ui.status.textContent = `streaming: ${inSeconds(vivace.samplesReceived)} / ${inSeconds(expected)} s`;
    setState("streaming");
  }
  if (decoder.midSample) throw new Error("the audio stream ended in the middle of a sample");
  if (!vivace.samplesReceived) throw new Error("the server sent no audio");
  picture.finish();
  return kept;
}

async function generate(event) {
  event.preventDefault();
  if (ui.generate.disabled) return;
  const clickedAt = performance.now();
  startAudio();
  resetRun();
  ui.generate.disabled = true;
  setState("loading");
  ui.status.textContent = "generating…";
  try {
    if (!model) await loadModel();
    const request = readRequest();
    const response = await fetch("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(request),
    });
    if (!response.ok) throw await apiError(response);
    const sampleRate = Number(response.headers.get("X-Sample-Rate")) || model.sample_rate;
    vivace.sampleRate = sampleRate;
    const chunks = await receive(response, request, sampleRate, clickedAt);
    wav = { url: URL.createObjectURL(wavBlob(chunks, sampleRate)), name: `vivace-${request.seed}.wav` };
    ui.download.disabled = false;
    ui.progress.value = 1;
    const seconds = ((performance.now() - clickedAt) / 1000).toFixed(2);
    ui.status.textContent = `done: ${(vivace.samplesReceived / sampleRate).toFixed(2)} s of audio in ${seconds} s`;
    setState("done");
  } catch (error) {
    showError(error.message);
    ui.status.textContent = "failed";
    setState("error");
  } finally {
    ui.generate.disabled = false;
  }
}

ui.form.addEventListener("submit", generate);
ui.download.addEventListener("click", download);
initialLoad();
