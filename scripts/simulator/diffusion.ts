/**
 * The simulated Stable Diffusion server (stablediffusion-fastapi-multigpu: FastAPI on uvicorn, one
 * pipeline, images one at a time): `/txt2img`, `/upload`, `/img2img`, FastAPI's `{"detail"}`
 * errors, and small valid PNGs derived from the request.
 */
import { createHash, randomUUID } from 'node:crypto'
import zlib from 'node:zlib'
import type { OutgoingHttpHeaders } from 'node:http'
import { preempted, sleep } from './behaviour.js'
import { beginWork, parseMultipart, startServer, tryJson, type Ctx, type Simulator } from './http.js'
import type { SimulatorOptions } from './options.js'

const CRC_TABLE = (() => {
  const t = new Uint32Array(256)
  for (let n = 0; n < 256; n++) {
    let c = n
    for (let k = 0; k < 8; k++) c = (c & 1) !== 0 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
    t[n] = c >>> 0
  }
  return t
})()

export function crc32 (buf: Buffer): number {
  let c = 0xffffffff
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8)
  return (c ^ 0xffffffff) >>> 0
}

function pngChunk (type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4)
  len.writeUInt32BE(data.length)
  const td = Buffer.concat([Buffer.from(type, 'ascii'), data])
  const crc = Buffer.alloc(4)
  crc.writeUInt32BE(crc32(td))
  return Buffer.concat([len, td, crc])
}

export const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])

/** A valid 8x8 RGB PNG whose pixels are derived from the seed. */
export function makePng (seed: string | Buffer, size = 8): Buffer {
  const h = createHash('sha256').update(seed).digest()
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(size, 0)
  ihdr.writeUInt32BE(size, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 2 // colour type RGB
  ihdr[10] = 0
  ihdr[11] = 0
  ihdr[12] = 0
  const raw = Buffer.alloc(size * (1 + size * 3))
  for (let y = 0; y < size; y++) {
    const row = y * (1 + size * 3)
    raw[row] = 0 // filter: none
    for (let x = 0; x < size; x++) {
      const p = row + 1 + x * 3
      raw[p] = (h[0] + x * 16) & 0xff
      raw[p + 1] = (h[1] + y * 16) & 0xff
      raw[p + 2] = h[2 + ((x + y) % 30)]
    }
  }
  return Buffer.concat([PNG_SIGNATURE, pngChunk('IHDR', ihdr), pngChunk('IDAT', zlib.deflateSync(raw)), pngChunk('IEND', Buffer.alloc(0))])
}

/** Decodes what makePng writes (and checks signature and CRCs); throws when the PNG is broken. */
export function readPng (buf: Buffer): { width: number, height: number, bitDepth: number, colorType: number, chunks: string[], pixels: Buffer } {
  if (buf.length < 8 || !buf.subarray(0, 8).equals(PNG_SIGNATURE)) throw new Error('not a PNG: bad signature')
  let pos = 8
  const chunks: string[] = []
  const idat: Buffer[] = []
  let ihdr: Buffer | null = null
  while (pos < buf.length) {
    if (pos + 12 > buf.length) throw new Error('truncated PNG chunk')
    const len = buf.readUInt32BE(pos)
    const type = buf.toString('ascii', pos + 4, pos + 8)
    if (pos + 12 + len > buf.length) throw new Error(`truncated PNG chunk ${type}`)
    const data = buf.subarray(pos + 8, pos + 8 + len)
    if (crc32(buf.subarray(pos + 4, pos + 8 + len)) !== buf.readUInt32BE(pos + 8 + len)) throw new Error(`bad CRC in ${type}`)
    chunks.push(type)
    if (type === 'IHDR') ihdr = data
    if (type === 'IDAT') idat.push(data)
    pos += 12 + len
    if (type === 'IEND') break
  }
  if (ihdr === null) throw new Error('no IHDR')
  if (chunks[chunks.length - 1] !== 'IEND') throw new Error('no IEND')
  const pixels = zlib.inflateSync(Buffer.concat(idat))
  return { width: ihdr.readUInt32BE(0), height: ihdr.readUInt32BE(4), bitDepth: ihdr[8], colorType: ihdr[9], chunks, pixels }
}

interface PydanticError {
  type: string
  loc: Array<string | number>
  msg: string
  input: unknown
  ctx?: Record<string, unknown>
}

/** FastAPI's reading of a JSON body: the object, or the 422 detail list. */
function fastApiJson (ctx: Ctx): { body: Record<string, unknown> } | { detail: PydanticError[] } {
  const ct = ctx.req.headers['content-type']
  const isJson = ct === undefined || /^application\/([a-z0-9.-]+\+)?json\b/i.test(ct.trim())
  let value: unknown = null
  if (ctx.raw.length > 0) {
    if (!isJson) value = ctx.text
    else {
      try {
        value = JSON.parse(ctx.text)
      } catch (err) {
        const msg = (err as Error).message
        const p = /position (\d+)/.exec(msg)
        const pos = p !== null ? Number(p[1]) : ctx.text.length
        const error = /non-whitespace character after JSON/i.test(msg)
          ? 'Extra data'
          : /Expected property name/i.test(msg) ? 'Expecting property name enclosed in double quotes' : 'Expecting value'
        return { detail: [{ type: 'json_invalid', loc: ['body', pos], msg: 'JSON decode error', input: {}, ctx: { error } }] }
      }
    }
  }
  if (value === null) return { detail: [{ type: 'missing', loc: ['body'], msg: 'Field required', input: null }] }
  if (typeof value !== 'object' || Array.isArray(value)) {
    return { detail: [{ type: 'model_attributes_type', loc: ['body'], msg: 'Input should be a valid dictionary or object to extract fields from', input: value }] }
  }
  return { body: value as Record<string, unknown> }
}

type SdField = [name: string, kind: 'str' | 'int' | 'float', required: boolean]

/** Pydantic v2 (lax mode) validation of the request model. */
function validate (body: Record<string, unknown>, fields: SdField[]): PydanticError[] {
  const errors: PydanticError[] = []
  for (const [name, kind, required] of fields) {
    const loc = ['body', name]
    if (!(name in body)) {
      if (required) errors.push({ type: 'missing', loc, msg: 'Field required', input: body })
      continue
    }
    const v = body[name]
    if (kind === 'str' && typeof v !== 'string') errors.push({ type: 'string_type', loc, msg: 'Input should be a valid string', input: v })
    if (kind === 'int') {
      if (typeof v === 'number' && !Number.isInteger(v)) errors.push({ type: 'int_from_float', loc, msg: 'Input should be a valid integer, got a number with a fractional part', input: v })
      else if (typeof v === 'string' && !/^\s*[-+]?\d+\s*$/.test(v)) errors.push({ type: 'int_parsing', loc, msg: 'Input should be a valid integer, unable to parse string as an integer', input: v })
      else if (typeof v !== 'number' && typeof v !== 'string' && typeof v !== 'boolean') errors.push({ type: 'int_type', loc, msg: 'Input should be a valid integer', input: v })
    }
    if (kind === 'float') {
      if (typeof v === 'string' && (v.trim() === '' || Number.isNaN(Number(v)))) errors.push({ type: 'float_parsing', loc, msg: 'Input should be a valid number, unable to parse string as a number', input: v })
      else if (typeof v !== 'number' && typeof v !== 'string' && typeof v !== 'boolean') errors.push({ type: 'float_type', loc, msg: 'Input should be a valid number', input: v })
    }
  }
  return errors
}

const SD_JSON = 'application/json'

export async function startDiffusionSimulator (opts: SimulatorOptions = {}): Promise<Simulator> {
  const imageDelayMs = opts.imageDelayMs ?? 20
  opts = { ...opts, cancelDelayMs: opts.cancelDelayMs ?? imageDelayMs }
  let queue: Promise<unknown> = Promise.resolve()
  /** the pipeline: one image at a time */
  const serialised = async <T>(job: () => Promise<T>): Promise<T> => {
    const p = queue.then(job)
    queue = p.catch(() => {})
    return await p
  }
  const parseBody = (ctx: Ctx): unknown => {
    const ct = ctx.req.headers['content-type'] ?? ''
    if (/^multipart\/form-data/i.test(ct)) {
      const parts = parseMultipart(ctx.raw, ct)
      if (parts === null) return undefined
      return {
        fields: Object.fromEntries(parts.filter(p => p.filename === undefined).map(p => [p.name, p.data.toString('utf8')])),
        files: parts.filter(p => p.filename !== undefined).map(p => ({ name: p.name, filename: p.filename, contentType: p.contentType, size: p.data.length }))
      }
    }
    return tryJson(ctx.text)
  }
  return await startServer(opts, parseBody, ctx => {
    const { res, method, path, sim } = ctx
    const json = (status: number, obj: unknown, headers: OutgoingHttpHeaders = {}): void => {
      const body = JSON.stringify(obj)
      res.writeHead(status, { server: 'uvicorn', 'Content-Type': SD_JSON, 'Content-Length': Buffer.byteLength(body), ...headers })
      res.end(body)
    }
    if (path !== '/txt2img' && path !== '/img2img' && path !== '/upload') return json(404, { detail: 'Not Found' })
    if (method !== 'POST') return json(405, { detail: 'Method Not Allowed' }, { allow: 'POST' })

    if (path === '/upload') {
      const parts = parseMultipart(ctx.raw, ctx.req.headers['content-type'] ?? '') ?? []
      const file = parts.find(p => p.name === 'file')
      if (file === undefined) return json(422, { detail: [{ type: 'missing', loc: ['body', 'file'], msg: 'Field required', input: null }] })
      if (file.filename === undefined) {
        const text = file.data.toString('utf8')
        return json(422, { detail: [{ type: 'value_error', loc: ['body', 'file'], msg: "Value error, Expected UploadFile, received: <class 'str'>", input: text, ctx: { error: {} } }] })
      }
      const id = randomUUID()
      sim.uploads.set(id, { filename: file.filename, contentType: file.contentType ?? 'application/octet-stream', data: file.data })
      return json(200, { file_id: id })
    }

    // txt2img / img2img: model work
    const parsed = tryJson(ctx.text) as Record<string, unknown> | undefined
    const model = parsed !== null && typeof parsed === 'object' && typeof parsed.model === 'string' ? parsed.model : 'sd'
    const ex = beginWork(ctx, path, model)
    ex.chunkedOver = Infinity
    const detail = (status: number, d: unknown): void => ex.plain(status, { server: 'uvicorn', 'Content-Type': SD_JSON }, JSON.stringify({ detail: d }))
    if (preempted(ex, SD_JSON)) return
    const read = fastApiJson(ctx)
    if ('detail' in read) return detail(422, read.detail)
    const body = read.body
    const fields: SdField[] = path === '/txt2img'
      ? [['prompt', 'str', true], ['num_inference_steps', 'int', false]]
      : [['prompt', 'str', true], ['file_id', 'str', true], ['num_inference_steps', 'int', false], ['strength', 'float', false]]
    const errors = validate(body, fields)
    if (errors.length > 0) return detail(422, errors)
    let seed: Buffer = Buffer.from(String(body.prompt))
    if (path === '/img2img') {
      const file = sim.uploads.get(String(body.file_id))
      if (file === undefined) return detail(404, 'File not found')
      seed = Buffer.concat([seed, Buffer.from(`|${String(body.strength ?? 0.5)}|`), file.data])
    }
    serialised(async () => {
      if (!ex.alive) return
      await sleep(imageDelayMs)
      if (!ex.alive) return
      ex.send(200, { server: 'uvicorn', 'Content-Type': 'image/png', 'Content-Disposition': `attachment; filename=${randomUUID()}.png` }, makePng(seed))
    }).catch((err: unknown) => detail(500, String(err)))
  })
}
