/**
 * Reading one field of a multipart/form-data body without holding the body: only the parts that
 * come before the first file are looked at (they are small text fields), and every byte read is
 * put back, so the whole body can still be streamed on as it arrives. Plain TypeScript.
 */
import { Readable } from 'node:stream'

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
