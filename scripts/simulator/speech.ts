/**
 * A simulated OpenAI-compatible speech server (the shape of faster-whisper-server / speaches and
 * Kokoro-FastAPI: FastAPI on uvicorn):
 * - `POST /v1/audio/transcriptions`: multipart (`file`, `model`, `language`, `response_format`, ...)
 *   → `{"text"}` (`response_format=text`: the text as text/plain);
 * - `POST /v1/audio/speech`: JSON `{model, input, voice, response_format}` → audio bytes
 *   (`audio/mpeg` by default), streamed in chunks;
 * - `GET /v1/models`, `GET /health`; FastAPI's `{"detail"}` errors.
 *
 * Both POST routes are model work, recorded on the GPU recorder from the moment the request's
 * headers arrive until the answer ends. The transcript names the size and SHA-256 of the uploaded
 * file, so a test can tell the file arrived whole. `uploadStarted()` resolves when the first body
 * bytes of a transcription have arrived, before the body has ended (a gateway that buffered the
 * upload would only send them at its end).
 */
import { createHash } from 'node:crypto'
import http from 'node:http'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { performance } from 'node:perf_hooks'
import { GpuRecorder } from './gpu-recorder.js'
import { parseMultipart, type RecordedRequest, type Simulator } from './http.js'
import type { SimulatorOptions } from './options.js'

export interface SpeechSimulator extends Simulator {
  /** Resolves when the next transcription upload has started to arrive (its body not yet complete). */
  uploadStarted: () => Promise<void>
}

const JSON_TYPE = 'application/json'
const FORMATS: Record<string, string> = { mp3: 'audio/mpeg', opus: 'audio/ogg', aac: 'audio/aac', flac: 'audio/flac', wav: 'audio/wav', pcm: 'audio/pcm' }

/** The transcript the simulator gives for a file: its size and digest, so a test can check it came whole. */
export function transcriptOf (file: Buffer): string {
  return `transcript of ${file.length} bytes sha256:${createHash('sha256').update(file).digest('hex').slice(0, 16)}`
}

/** Deterministic "audio": MPEG frame headers and bytes derived from the text, about 1 KiB per 10 characters. */
export function speechBytes (input: string): Buffer {
  const frames: Buffer[] = []
  const count = Math.max(1, Math.ceil(input.length / 10))
  for (let i = 0; i < count; i++) {
    const body = createHash('sha512').update(`${i}:${input}`).digest()
    const frame = Buffer.alloc(1044)
    frame.set([0xff, 0xfb, 0x90, 0x64])
    for (let p = 4; p < frame.length; p++) frame[p] = body[p % body.length]
    frames.push(frame)
  }
  return Buffer.concat(frames)
}

export async function startSpeechSimulator (opts: SimulatorOptions & { models?: string[] } = {}): Promise<SpeechSimulator> {
  const models = opts.models ?? ['Systran/faster-whisper-small']
  const delayMs = opts.tokenDelayMs ?? 20
  const sockets = new Set<Socket>()
  const uploadWaiters: Array<() => void> = []
  const server = http.createServer({ noDelay: true })
  server.on('connection', (socket: Socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  let workSeq = 0
  let running = 0

  const sim: SpeechSimulator = {
    url: '',
    host: '',
    port: 0,
    gpuIds: [],
    recorder: opts.recorder ?? new GpuRecorder(),
    requests: [],
    behaviour: { kind: 'normal' },
    uploads: new Map(),
    cancelDelayMs: opts.cancelDelayMs ?? 0,
    polls: [],
    loads: [],
    unloads: [],
    resident: () => [],
    running: () => running,
    costs: () => ({ computedPromptTokens: 0, cachedPromptTokens: 0, loads: {}, requests: [] }),
    activeConnections: () => [...sockets].filter(s => !s.destroyed).length,
    close: async () => {
      await new Promise<void>(resolve => {
        server.close(() => setImmediate(resolve))
        for (const s of sockets) s.destroy()
      })
    },
    uploadStarted: async () => await new Promise<void>(resolve => uploadWaiters.push(resolve))
  }

  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    const url = req.url ?? '/'
    const path = url.split('?')[0]
    const method = req.method ?? 'GET'
    res.on('error', () => {})
    req.on('error', () => {})
    const json = (status: number, obj: unknown): void => {
      if (res.headersSent || res.destroyed) return
      const body = JSON.stringify(obj)
      res.writeHead(status, { server: 'uvicorn', 'Content-Type': JSON_TYPE, 'Content-Length': Buffer.byteLength(body) })
      res.end(body)
    }
    const work = method === 'POST' && (path === '/v1/audio/transcriptions' || path === '/v1/audio/speech')
    const model = /[?&]model=([^&]*)/.exec(url)?.[1]
    let id: number | null = work ? sim.recorder.enter(sim.gpuIds, `${sim.host} ${path} #${++workSeq}`, { model }) : null
    if (work) running++
    const done = (): void => {
      if (id === null) return
      sim.recorder.exit(id)
      running--
      id = null
    }
    // a request the client cancels keeps the GPU until the server notices (cancelDelayMs)
    res.once('close', () => {
      if (!res.writableFinished && sim.cancelDelayMs > 0) setTimeout(done, sim.cancelDelayMs)
      else done()
    })

    const chunks: Buffer[] = []
    let announced = false
    req.on('data', (c: Buffer) => {
      chunks.push(c)
      if (path === '/v1/audio/transcriptions' && !announced && !req.complete) {
        announced = true
        for (const w of uploadWaiters.splice(0)) w()
      }
    })
    req.on('end', () => {
      const raw = Buffer.concat(chunks)
      const contentType = req.headers['content-type'] ?? ''
      const parts = /^multipart\/form-data/i.test(contentType) ? parseMultipart(raw, contentType) : null
      const record: RecordedRequest = {
        method,
        path,
        url,
        headers: req.headers,
        rawBody: parts === null ? raw.toString('utf8') : `<${raw.length} bytes of multipart>`,
        body: parts === null
          ? tryJson(raw.toString('utf8'))
          : {
              fields: Object.fromEntries(parts.filter(p => p.filename === undefined).map(p => [p.name, p.data.toString('utf8')])),
              files: parts.filter(p => p.filename !== undefined).map(p => ({ name: p.name, filename: p.filename, contentType: p.contentType, size: p.data.length }))
            },
        at: performance.now()
      }
      sim.requests.push(record)
      if (method === 'GET' && path === '/health') return json(200, { status: 'ok' })
      if (method === 'GET' && path === '/v1/models') {
        return json(200, { object: 'list', data: models.map(m => ({ id: m, object: 'model', created: 1735689600, owned_by: m.split('/')[0] })) })
      }
      if (!work) return json(404, { detail: 'Not Found' })
      const b = sim.behaviour
      if (b.kind === 'error') {
        done()
        return json(b.status, b.body)
      }
      if (b.kind === 'stall-headers') return
      if (path === '/v1/audio/transcriptions') {
        const file = parts?.find(p => p.name === 'file' && p.filename !== undefined)
        if (parts === null || file === undefined) {
          done()
          return json(422, { detail: [{ type: 'missing', loc: ['body', 'file'], msg: 'Field required', input: null }] })
        }
        const fields = record.body.fields as Record<string, string>
        setTimeout(() => {
          done()
          const text = transcriptOf(file.data)
          if (fields.response_format === 'text') {
            res.writeHead(200, { server: 'uvicorn', 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(text) })
            res.end(text)
            return
          }
          json(200, { text })
        }, delayMs)
        return
      }
      const body = record.body as { input?: unknown, response_format?: unknown } | undefined
      if (typeof body?.input !== 'string') {
        done()
        return json(422, { detail: [{ type: 'missing', loc: ['body', 'input'], msg: 'Field required', input: body ?? null }] })
      }
      const format = typeof body.response_format === 'string' ? body.response_format : 'mp3'
      const type = FORMATS[format]
      if (type === undefined) {
        done()
        return json(422, { detail: [{ type: 'enum', loc: ['body', 'response_format'], msg: "Input should be 'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm'", input: format }] })
      }
      void streamAudio(res, speechBytes(body.input), type, delayMs, b.kind === 'die-mid-stream' ? b.afterLines : undefined, done)
    })
  })

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve())
  })
  const port = (server.address() as AddressInfo).port
  sim.port = port
  sim.host = `127.0.0.1:${port}`
  sim.url = `http://${sim.host}`
  sim.gpuIds = opts.gpuIds ?? [sim.host]
  return sim
}

/** StreamingResponse: chunked, four chunks; `cutAfter` chunks then the connection dies. */
async function streamAudio (res: ServerResponse, audio: Buffer, type: string, delayMs: number, cutAfter: number | undefined, done: () => void): Promise<void> {
  res.writeHead(200, { server: 'uvicorn', 'Content-Type': type })
  const size = Math.ceil(audio.length / 4)
  for (let i = 0; i < 4; i++) {
    await new Promise(resolve => setTimeout(resolve, delayMs / 4))
    if (res.destroyed) return
    if (cutAfter !== undefined && i >= cutAfter) {
      done()
      res.socket?.destroy()
      return
    }
    res.write(audio.subarray(i * size, (i + 1) * size))
  }
  done()
  res.end()
}

function tryJson (text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}
