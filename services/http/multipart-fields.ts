/**
 * Reading one field of a multipart/form-data body without holding the body: only the parts that
 * come before the first file are looked at (they are small text fields), and every byte read is
 * put back, so the whole body can still be streamed on as it arrives. Plain TypeScript.
 */
import { Readable, Transform, type TransformCallback } from 'node:stream'
import { GatewayError } from './errors.js'
import { modelKey } from '../fleet/model-name.js'

export interface LeadingField {
  /** The field's value, when a text part of that name came before any file part. */
  value?: string
  /** The body from its first byte: the same stream with what was read put back (or a copy, if it had ended). */
  body: Readable
}

/** The boundary of a multipart Content-Type, undefined when it has none. */
export function multipartBoundary (contentType: string | undefined): string | undefined {
  if (contentType == null || !/^multipart\/form-data\s*;/i.test(contentType)) return undefined
  const m = /;\s*boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))/i.exec(contentType)
  return m?.[1] ?? m?.[2]
}

type Scan = { done: false } | { done: true, value?: string }

/** Looks through the parts in `buf` for the text field `name`; done once it is found or cannot come any more. */
function scan (buf: Buffer, boundary: string, name: string): Scan {
  const dash = Buffer.from(`--${boundary}`)
  const delimiter = Buffer.from(`\r\n--${boundary}`)
  let pos = buf.indexOf(dash)
  if (pos < 0) return { done: false }
  pos += dash.length
  for (;;) {
    if (buf.length < pos + 2) return { done: false }
    if (buf[pos] === 0x2d && buf[pos + 1] === 0x2d) return { done: true } // the closing delimiter: no such field
    const headEnd = buf.indexOf('\r\n\r\n', pos)
    if (headEnd < 0) return { done: false }
    const head = buf.toString('utf8', pos, headEnd)
    const disposition = /^content-disposition:(.*)$/im.exec(head)?.[1] ?? ''
    if (/;\s*filename\*?=/i.test(disposition)) return { done: true } // a file: the field would come after it
    const next = buf.indexOf(delimiter, headEnd + 4)
    if (next < 0) return { done: false }
    const partName = /;\s*name="([^"]*)"/i.exec(disposition)?.[1] ?? /;\s*name=([^;\s]+)/i.exec(disposition)?.[1]
    if (partName === name) return { done: true, value: buf.toString('utf8', headEnd + 4, next) }
    pos = next + delimiter.length
  }
}

/**
 * Reads `body` until the text field `name` is found, a file part begins, or `limit` bytes have
 * been read without either; then hands the body back, from its first byte.
 */
export async function readLeadingField (body: Readable, boundary: string, name: string, limit: number): Promise<LeadingField> {
  const chunks: Buffer[] = []
  let size = 0
  return await new Promise<LeadingField>((resolve, reject) => {
    const stopListening = (): void => {
      body.off('data', onData)
      body.off('end', onEnd)
      body.off('error', onError)
      body.off('close', onClose)
    }
    const finish = (value: string | undefined, ended: boolean): void => {
      body.pause()
      stopListening()
      const head = Buffer.concat(chunks)
      if (ended) {
        resolve({ value, body: Readable.from(head.length > 0 ? [head] : []) })
        return
      }
      if (head.length > 0) body.unshift(head)
      resolve({ value, body })
    }
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk)
      size += chunk.length
      const found = scan(Buffer.concat(chunks), boundary, name)
      if (found.done) finish(found.value, false)
      else if (size >= limit) finish(undefined, false)
    }
    const onEnd = (): void => {
      const found = scan(Buffer.concat(chunks), boundary, name)
      finish(found.done ? found.value : undefined, true)
    }
    const onError = (err: Error): void => {
      stopListening()
      reject(err)
    }
    // the client went away mid-upload: no end, maybe no error either
    const onClose = (): void => onError(Object.assign(new Error('client closed request'), { statusCode: 499 }))
    body.on('data', onData)
    body.once('end', onEnd)
    body.once('error', onError)
    body.once('close', onClose)
  })
}

/** A part's header block larger than this is refused (real ones are a few hundred bytes). */
const PART_HEAD_LIMIT = 16 * 1024

/**
 * What a `Content-Disposition` header says of its part: the field name and whether it is a file.
 * One pass, no pattern: parameters split at `;` outside quotes; `name*` (RFC 5987) counts as a
 * name. `ambiguous` when the part names itself twice: a server could read either.
 */
function dispositionOf (value: string): { name?: string, file: boolean, ambiguous: boolean } {
  let name: string | undefined
  let file = false
  let ambiguous = false
  let i = value.indexOf(';')
  if (i < 0) return { file, ambiguous }
  i++
  while (i < value.length) {
    let end = i
    while (end < value.length && value[end] !== '=' && value[end] !== ';') end++
    const key = value.slice(i, end).trim().toLowerCase()
    let param = ''
    i = end
    if (value[i] === '=') {
      i++
      while (value[i] === ' ' || value[i] === '\t') i++
      if (value[i] === '"') {
        i++
        while (i < value.length && value[i] !== '"') {
          if (value[i] === '\\' && i + 1 < value.length) i++
          param += value[i]
          i++
        }
        i++
      } else {
        const start = i
        while (i < value.length && value[i] !== ';') i++
        param = value.slice(start, i).trim()
      }
    }
    while (i < value.length && value[i] !== ';') i++
    i++
    if (key === 'filename' || key === 'filename*') file = true
    if (key === 'name' || key === 'name*') {
      if (name !== undefined) ambiguous = true
      name = key === 'name' ? param : decodeExtended(param)
    }
  }
  return { name, file, ambiguous }
}

/** `utf-8''mo%64el` → `model` (RFC 5987); undecodable: the raw text (it then matches no field). */
function decodeExtended (param: string): string {
  const quote = param.indexOf("''")
  try {
    return decodeURIComponent(quote < 0 ? param : param.slice(quote + 2))
  } catch {
    return param
  }
}

/** The part a header block describes; `ambiguous` when it carries two Content-Disposition headers or two names. */
function partOf (head: string): { name?: string, file: boolean, ambiguous: boolean } {
  let found: { name?: string, file: boolean, ambiguous: boolean } | undefined
  for (const line of head.split('\r\n')) {
    const colon = line.indexOf(':')
    if (colon < 0 || line.slice(0, colon).trim().toLowerCase() !== 'content-disposition') continue
    if (found !== undefined) return { ...found, ambiguous: true }
    found = dispositionOf(line.slice(colon + 1))
  }
  return found ?? { file: false, ambiguous: false }
}

export interface ModelCheckOptions {
  /** The model of `?model=`: a `model` field must then name the same model. */
  model?: string
  /** Bytes read at most before the first file part while looking for the model field. */
  leadingLimit: number
  /** Longest model name (a longer `model` field is refused). */
  modelMax: number
}

/**
 * A multipart/form-data body on its way to a server, checked so that the model the gateway leased
 * for is the model the server reads (CONTRACT 18): a `model` field may appear once, anywhere, and
 * must name the model of `?model=` when one was given; otherwise 400 (a GatewayError).
 *
 * The body streams through: `leading` answers the model of a `model` field sent before the first
 * file (or undefined), once that file begins, the body ends or `leadingLimit` bytes came without
 * a file; nothing passes on before that, so a break of the rules there is refused before any
 * lease. After it, a `model` part is held back until it has been checked and a break ends this
 * stream with the error, before the closing delimiter has passed: the server never sees a whole
 * body, so it never runs it.
 */
export class MultipartModelCheck extends Transform {
  /** The model of a `model` field before the first file, once the leading fields are known. */
  readonly leading: Promise<string | undefined>
  private resolveLeading!: (model: string | undefined) => void
  private rejectLeading!: (err: Error) => void
  private leadingDone = false
  private readonly held: Buffer[] = []
  private heldBytes = 0

  private readonly delimiter: Buffer
  /** Bytes not yet passed on; it starts with a CRLF of our own (the first delimiter has none). */
  private pending: Buffer = Buffer.from('\r\n')
  private ownBytes = 2
  private state: 'body' | 'head' | 'end' = 'body'
  /** Where in `pending` the delimiter search goes on. */
  private searchFrom = 0
  /** In a `model` part: where its value starts in `pending` (held until checked). */
  private modelValueAt = -1
  private models = 0
  private leadingModel?: string

  constructor (boundary: string, private readonly opts: ModelCheckOptions) {
    super()
    this.delimiter = Buffer.from(`\r\n--${boundary}`)
    this.leading = new Promise((resolve, reject) => {
      this.resolveLeading = resolve
      this.rejectLeading = reject
    })
    // awaited by the route only when nothing failed first
    this.leading.catch(() => {})
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk])
      this.scan()
      if (!this.leadingDone && this.heldBytes + this.pending.length >= this.opts.leadingLimit) this.endLeading()
      callback()
    } catch (err) {
      callback(err as Error)
    }
  }

  override _flush (callback: TransformCallback): void {
    // Without its closing delimiter the last part would go unchecked (some servers still read it).
    if (this.state !== 'end') {
      try {
        this.refuse('the multipart body ends before its closing delimiter')
      } catch (err) {
        callback(err as Error)
        return
      }
    }
    this.pass(this.pending.length)
    callback()
  }

  override _destroy (err: Error | null, callback: (error?: Error | null) => void): void {
    if (!this.leadingDone) {
      this.leadingDone = true
      this.rejectLeading(err ?? Object.assign(new Error('client closed request'), { statusCode: 499 }))
    }
    callback(err)
  }

  private refuse (message: string): never {
    const err = new GatewayError(400, message)
    if (!this.leadingDone) {
      this.leadingDone = true
      this.rejectLeading(err)
    }
    throw err
  }

  private endLeading (): void {
    if (this.leadingDone) return
    this.leadingDone = true
    for (const chunk of this.held.splice(0)) this.push(chunk)
    this.heldBytes = 0
    this.resolveLeading(this.leadingModel)
  }

  /** Passes on the first `n` bytes of `pending` (held while the leading fields are read). */
  private pass (n: number): void {
    const own = Math.min(this.ownBytes, n)
    this.ownBytes -= own
    const bytes = this.pending.subarray(own, n)
    this.pending = this.pending.subarray(n)
    this.searchFrom = Math.max(0, this.searchFrom - n)
    if (this.modelValueAt >= 0) this.modelValueAt -= n
    if (bytes.length === 0) return
    if (this.leadingDone) this.push(bytes)
    else {
      this.held.push(bytes)
      this.heldBytes += bytes.length
    }
  }

  private scan (): void {
    const d = this.delimiter
    for (;;) {
      if (this.state === 'end') {
        this.pass(this.pending.length)
        return
      }
      if (this.state === 'body') {
        const at = this.pending.indexOf(d, this.searchFrom)
        if (at < 0) {
          const keep = d.length - 1
          if (this.modelValueAt >= 0) {
            // a model part's value is held whole until checked; a long one is no model name
            if (this.pending.length - this.modelValueAt > this.opts.modelMax * 4 + keep) this.refuse(`model is longer than ${this.opts.modelMax} characters`)
            this.searchFrom = Math.max(0, this.pending.length - keep)
          } else {
            this.pass(Math.max(0, this.pending.length - keep))
            this.searchFrom = 0
          }
          return
        }
        if (this.modelValueAt >= 0) this.checkModel(this.pending.toString('utf8', this.modelValueAt, at))
        this.modelValueAt = -1
        this.pass(at)
        this.state = 'head'
        this.searchFrom = d.length
        continue
      }
      // head: after a delimiter
      if (this.pending.length < d.length + 2) return
      if (this.pending[d.length] === 0x2d && this.pending[d.length + 1] === 0x2d) {
        // the closing delimiter: every part has been seen
        this.endLeading()
        this.state = 'end'
        continue
      }
      const headEnd = this.pending.indexOf('\r\n\r\n', this.searchFrom)
      if (headEnd < 0) {
        if (this.pending.length > PART_HEAD_LIMIT) this.refuse('a multipart part header is too large')
        this.searchFrom = Math.max(d.length, this.pending.length - 3)
        return
      }
      const part = partOf(this.pending.toString('utf8', d.length, headEnd))
      if (part.ambiguous) this.refuse('a multipart part names itself more than once')
      const valueAt = headEnd + 4
      if (part.name === 'model') {
        if (part.file) this.refuse('the model field must be a plain form field, not a file')
        if (++this.models > 1) this.refuse('the model field appears more than once')
        this.modelValueAt = valueAt
      } else {
        if (part.file) this.endLeading()
        this.pass(valueAt)
      }
      this.state = 'body'
      this.searchFrom = this.modelValueAt >= 0 ? valueAt : 0
    }
  }

  private checkModel (raw: string): void {
    const value = raw.trim()
    if (value.length > this.opts.modelMax) this.refuse(`model is longer than ${this.opts.modelMax} characters`)
    const expected = this.opts.model
    // compared as the gateway compares model names (case, `:latest`)
    if (expected != null && modelKey(value) !== modelKey(expected)) {
      this.refuse(`the model field names another model than ?model= (${JSON.stringify(value)}, not ${JSON.stringify(expected)})`)
    }
    if (!this.leadingDone) this.leadingModel = value
  }
}

/**
 * The client's multipart `body` checked on its way (MultipartModelCheck): the stream to forward.
 * A client gone mid-upload, or a body cut off at BODY_LIMIT, ends it with that error.
 */
export function checkModelField (body: Readable, boundary: string, opts: ModelCheckOptions): MultipartModelCheck {
  const check = new MultipartModelCheck(boundary, opts)
  body.on('error', (err) => check.destroy(err))
  body.once('close', () => {
    if (!body.readableEnded) check.destroy(Object.assign(new Error('client closed request'), { statusCode: 499 }))
  })
  // refused: the rest of the upload is not read (the answer closes the connection)
  check.once('error', () => body.unpipe(check))
  body.pipe(check)
  return check
}

export interface CheckedUpload {
  /** `?model=`, else the `model` field sent before the file; undefined when neither. */
  model?: string
  /** The upload from its first byte, checked on its way: the body to forward. */
  body: MultipartModelCheck
}

/**
 * An upload's model and its body, checked (400 as a GatewayError: not multipart, a model too long,
 * a `model` field twice or naming another model than `?model=`). Resolves once the fields before
 * the file have been read, so what breaks the rules there is refused before anything is leased.
 */
export async function checkedUpload (contentType: string | undefined, queryModel: unknown, body: Readable,
  opts: Omit<ModelCheckOptions, 'model'>): Promise<CheckedUpload> {
  const boundary = multipartBoundary(contentType)
  if (boundary == null) throw new GatewayError(400, 'request body must be multipart/form-data with a boundary')
  // a server reading another of two boundaries would see other parts than the ones checked
  const boundaries = (contentType as string).split(';').filter((param) => param.split('=')[0].trim().toLowerCase() === 'boundary')
  if (boundaries.length > 1) throw new GatewayError(400, 'the Content-Type names more than one boundary')
  const asked = typeof queryModel === 'string' && queryModel !== '' ? queryModel : undefined
  if (asked != null && asked.length > opts.modelMax) throw new GatewayError(400, `model is longer than ${opts.modelMax} characters`)
  const checked = checkModelField(body, boundary, { ...opts, model: asked })
  const leading = await checked.leading
  // refused already in what came with the leading fields (a second model field after a small file)
  if (checked.errored != null) throw checked.errored
  return { model: asked ?? (leading === '' ? undefined : leading), body: checked }
}
