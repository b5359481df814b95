/**
 * A strict reader of the Prometheus text exposition format (version 0.0.4), enough to check what
 * the gateway's /metrics says: every line must be a comment, a HELP/TYPE line or a sample, every
 * sample must belong to a family with a TYPE, and values must be numbers.
 */

export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

export interface Exposition {
  samples: Sample[]
  /** family name → counter | gauge | histogram | summary | untyped */
  types: Map<string, string>
  /** The one sample with this name and exactly these labels; 0 when there is none (a counter not yet incremented). */
  value: (name: string, labels?: Record<string, string>) => number
  /** Samples with this name whose labels include `labels`. */
  find: (name: string, labels?: Record<string, string>) => Sample[]
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*'
const SAMPLE = new RegExp(`^(${NAME})(?:\\{(.*)\\})?\\s+(\\S+)(?:\\s+-?\\d+)?$`)
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)/y

function parseValue (raw: string, line: string): number {
  if (raw === '+Inf') return Infinity
  if (raw === '-Inf') return -Infinity
  // Prometheus reads values with Go's ParseFloat, which ignores case (prom-client writes `Nan`).
  if (/^nan$/i.test(raw)) return NaN
  const n = Number(raw)
  if (Number.isNaN(n)) throw new Error(`not a number in ${JSON.stringify(line)}`)
  return n
}

function parseLabels (raw: string, line: string): Record<string, string> {
  const labels: Record<string, string> = {}
  LABEL.lastIndex = 0
  while (LABEL.lastIndex < raw.length) {
    const m = LABEL.exec(raw)
    if (m == null) throw new Error(`bad labels in ${JSON.stringify(line)}`)
    labels[m[1]] = m[2].replace(/\\(.)/g, (_all, c: string) => (c === 'n' ? '\n' : c))
  }
  return labels
}

/** The family a sample belongs to: histogram samples carry _bucket, _sum and _count suffixes. */
function familyOf (name: string, types: Map<string, string>): string | undefined {
  if (types.has(name)) return name
  for (const suffix of ['_bucket', '_sum', '_count', '_total', '_created']) {
    if (name.endsWith(suffix) && types.has(name.slice(0, -suffix.length))) return name.slice(0, -suffix.length)
  }
  return undefined
}

export function parsePrometheus (text: string): Exposition {
  const samples: Sample[] = []
  const types = new Map<string, string>()
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line)
      if (m == null) continue // a plain comment
      if (m[1] === 'TYPE') {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3] ?? '')) throw new Error(`bad TYPE line ${JSON.stringify(line)}`)
        if (types.has(m[2])) throw new Error(`family ${m[2]} typed twice`)
        types.set(m[2], m[3] as string)
      }
      continue
    }
    const m = SAMPLE.exec(line)
    if (m == null) throw new Error(`not a sample line: ${JSON.stringify(line)}`)
    const sample = { name: m[1], labels: m[2] != null ? parseLabels(m[2], line) : {}, value: parseValue(m[3], line) }
    if (familyOf(sample.name, types) == null) throw new Error(`sample ${sample.name} has no TYPE line before it`)
    samples.push(sample)
  }
  const matches = (sample: Sample, labels: Record<string, string>): boolean =>
    Object.entries(labels).every(([k, v]) => sample.labels[k] === v)
  const find = (name: string, labels: Record<string, string> = {}): Sample[] =>
    samples.filter((s) => s.name === name && matches(s, labels))
  const value = (name: string, labels: Record<string, string> = {}): number => {
    const exact = samples.filter((s) => s.name === name && matches(s, labels) && Object.keys(s.labels).length === Object.keys(labels).length)
    if (exact.length > 1) throw new Error(`${exact.length} samples ${name} ${JSON.stringify(labels)}`)
    return exact[0]?.value ?? 0
  }
  return { samples, types, value, find }
}

/** GET /metrics and parse it; fails on a non-200 or a wrong content type. */
export async function scrape (baseUrl: string): Promise<Exposition> {
  const res = await fetch(`${baseUrl}/metrics`)
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`)
  const type = res.headers.get('content-type') ?? ''
  if (!type.startsWith('text/plain') || !type.includes('version=0.0.4')) throw new Error(`/metrics content type ${type}`)
  return parsePrometheus(await res.text())
}
