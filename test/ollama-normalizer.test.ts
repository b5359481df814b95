import { isDeepStrictEqual } from 'node:util'
import t from 'tap'
import { normalizeOllamaBody, parseKeepAlive, type KeepAlive } from '../services/http/ollama-normalizer.js'

const FORCE_M1: KeepAlive = { mode: 'force', json: '-1' }
const FORCE_5M: KeepAlive = { mode: 'force', json: '"5m"' }
const PASS: KeepAlive = { mode: 'passthrough' }

function norm (raw: string, keepAlive: KeepAlive = FORCE_M1) {
  return normalizeOllamaBody(raw, JSON.parse(raw) as Record<string, unknown>, keepAlive)
}

/** Expected semantics, computed on the parsed value. */
function expected (raw: string, keepAlive: KeepAlive): Record<string, unknown> {
  const obj = JSON.parse(raw) as Record<string, unknown>
  if (keepAlive.mode === 'force') obj.keep_alive = JSON.parse(keepAlive.json)
  if (!Object.hasOwn(obj, 'stream') || obj.stream === null) obj.stream = true
  return obj
}

function check (t: Asserts, raw: string, keepAlive: KeepAlive, out: string, msg?: string): void {
  t.strictSame(JSON.parse(out), expected(raw, keepAlive), msg ?? 'parses to the expected object')
}

/** The part of a tap Test that check() uses. */
interface Asserts { strictSame: (found: unknown, wanted: unknown, msg: string) => boolean }

t.test('parseKeepAlive', async t => {
  t.strictSame(parseKeepAlive('-1'), { mode: 'force', json: '-1' })
  t.strictSame(parseKeepAlive('300'), { mode: 'force', json: '300' })
  t.strictSame(parseKeepAlive('0'), { mode: 'force', json: '0' })
  t.strictSame(parseKeepAlive('1.5'), { mode: 'force', json: '1.5' })
  t.strictSame(parseKeepAlive('1e3'), { mode: 'force', json: '1e3' })
  t.strictSame(parseKeepAlive('5m'), { mode: 'force', json: '"5m"' })
  t.strictSame(parseKeepAlive('-1m'), { mode: 'force', json: '"-1m"' })
  t.strictSame(parseKeepAlive('1h30m'), { mode: 'force', json: '"1h30m"' })
  t.strictSame(parseKeepAlive('passthrough'), { mode: 'passthrough' })
  // Not JSON number literals: forced as strings.
  t.strictSame(parseKeepAlive('01'), { mode: 'force', json: '"01"' })
  t.strictSame(parseKeepAlive('+5'), { mode: 'force', json: '"+5"' })
  t.strictSame(parseKeepAlive('.5'), { mode: 'force', json: '".5"' })
  t.strictSame(parseKeepAlive('a"b\\c'), { mode: 'force', json: '"a\\"b\\\\c"' })
  t.throws(() => parseKeepAlive(''))
  t.throws(() => parseKeepAlive('1e999'))
})

t.test('stream', async t => {
  let r = norm('{"model":"m","keep_alive":-1}')
  t.equal(r.body, '{"model":"m","keep_alive":-1,"stream":true}')
  t.equal(r.changed, true)

  r = norm('{"model":"m","stream":null,"keep_alive":-1}')
  t.equal(r.body, '{"model":"m","stream":true,"keep_alive":-1}')
  t.equal(r.changed, true)

  for (const v of ['false', 'true', '0', '"no"', '{}', '[]']) {
    const raw = `{"model":"m","stream":${v},"keep_alive":-1}`
    r = norm(raw)
    t.equal(r.body, raw, `stream ${v} kept`)
    t.equal(r.changed, false)
  }
})

t.test('keep_alive replaced', async t => {
  const cases: Array<[string, string]> = [
    ['300', '-1'],
    ['"10m"', '-1'],
    ['null', '-1'],
    ['{"a":{"b":[1,2,"}"]},"c":"]"}', '-1'],
    ['[1, [2, {"x": "y"}], "]"]', '-1'],
    ['"-1"', '-1'],
    ['true', '-1']
  ]
  for (const [v, want] of cases) {
    const raw = `{"model":"m","keep_alive":${v},"stream":false,"x":1.0}`
    const r = norm(raw)
    t.equal(r.body, `{"model":"m","keep_alive":${want},"stream":false,"x":1.0}`, `replaces ${v}`)
    t.equal(r.changed, true)
  }
  let r = norm('{"model":"m","keep_alive":-1,"stream":false}', FORCE_5M)
  t.equal(r.body, '{"model":"m","keep_alive":"5m","stream":false}')

  // Already the configured value: untouched, even written differently.
  for (const raw of ['{"keep_alive":-1,"stream":true}', '{"keep_alive":-1.0,"stream":true}', '{"keep_alive":-1e0,"stream":true}']) {
    r = norm(raw)
    t.equal(r.body, raw)
    t.equal(r.changed, false)
  }
  r = norm('{"keep_alive":"5m","stream":true}', FORCE_5M)
  t.equal(r.changed, false)
  r = norm('{"keep_alive":"-1","stream":true}', FORCE_M1)
  t.equal(r.body, '{"keep_alive":-1,"stream":true}', 'string "-1" is not the number -1')

  r = norm('{"model":"m","stream":true}')
  t.equal(r.body, '{"model":"m","stream":true,"keep_alive":-1}', 'inserted when absent')
  r = norm('{"model":"m"}', FORCE_5M)
  t.equal(r.body, '{"model":"m","keep_alive":"5m","stream":true}', 'both inserted')
  r = norm('{"model":"m","keep_alive":300}', { mode: 'force', json: '1.5' })
  t.equal(r.body, '{"model":"m","keep_alive":1.5,"stream":true}', 'replaced and stream inserted')
})

t.test('passthrough', async t => {
  let r = norm('{"model":"m","keep_alive":"10m","stream":false}', PASS)
  t.equal(r.changed, false)
  t.equal(r.body, '{"model":"m","keep_alive":"10m","stream":false}')
  r = norm('{"model":"m","keep_alive":"10m"}', PASS)
  t.equal(r.body, '{"model":"m","keep_alive":"10m","stream":true}')
  r = norm('{"model":"m"}', PASS)
  t.equal(r.body, '{"model":"m","stream":true}')
  r = norm('{"model":"m","stream":null,"keep_alive":7}', PASS)
  t.equal(r.body, '{"model":"m","stream":true,"keep_alive":7}')
})

t.test('duplicate keys are all replaced', async t => {
  let raw = '{"keep_alive":1,"model":"m","keep_alive":"2m","stream":false}'
  let r = norm(raw)
  t.equal(r.body, '{"keep_alive":-1,"model":"m","keep_alive":-1,"stream":false}')
  check(t, raw, FORCE_M1, r.body)

  raw = '{"stream":false,"model":"m","stream":null,"keep_alive":-1}'
  r = norm(raw)
  t.equal(r.body, '{"stream":true,"model":"m","stream":true,"keep_alive":-1}')
  check(t, raw, FORCE_M1, r.body)

  raw = '{"keep_alive" : 1 , "keep\\u005falive":\t"3m"\n, "\\u0073tream": null}'
  r = norm(raw)
  t.equal(r.body, '{"keep_alive" : -1 , "keep\\u005falive":\t-1\n, "\\u0073tream": true}')
  check(t, raw, FORCE_M1, r.body)
})

t.test('nested look-alikes are untouched', async t => {
  let raw = '{"model":"m","options":{"stream":null,"keep_alive":5},"stream":false}'
  let r = norm(raw)
  t.equal(r.body, '{"model":"m","options":{"stream":null,"keep_alive":5},"stream":false,"keep_alive":-1}')
  check(t, raw, FORCE_M1, r.body)

  raw = '{"prompt":"say \\"keep_alive\\": 5, \\"stream\\": null}","keep_alive":3,"stream":false}'
  r = norm(raw)
  t.equal(r.body, '{"prompt":"say \\"keep_alive\\": 5, \\"stream\\": null}","keep_alive":-1,"stream":false}')
  check(t, raw, FORCE_M1, r.body)

  raw = '{"p":"ends with backslash \\\\","keep_alive":3,"q":"\\\\\\"","stream":false}'
  r = norm(raw)
  t.equal(r.body, '{"p":"ends with backslash \\\\","keep_alive":-1,"q":"\\\\\\"","stream":false}')

  raw = '{"messages":[{"role":"user","content":"{\\"stream\\":null}"},{"keep_alive":1,"stream":null}],"keep_alive":2}'
  r = norm(raw)
  t.equal(r.body, '{"messages":[{"role":"user","content":"{\\"stream\\":null}"},{"keep_alive":1,"stream":null}],"keep_alive":-1,"stream":true}')
  check(t, raw, FORCE_M1, r.body)

  // A string value equal to a key name is not a key.
  raw = '{"a":"keep_alive","b":["stream"],"keep_alive":1}'
  r = norm(raw)
  t.equal(r.body, '{"a":"keep_alive","b":["stream"],"keep_alive":-1,"stream":true}')
})

t.test('whitespace and object shapes', async t => {
  let raw = '  {\n  "model": "m",\n  "keep_alive": 300\n}\n\t '
  let r = norm(raw)
  t.equal(r.body, '  {\n  "model": "m",\n  "keep_alive": -1,"stream":true\n}\n\t ')
  check(t, raw, FORCE_M1, r.body)

  raw = '{\r\n\t"model" :\t"m" \r\n}   '
  r = norm(raw)
  t.equal(r.body, '{\r\n\t"model" :\t"m","keep_alive":-1,"stream":true \r\n}   ')
  check(t, raw, FORCE_M1, r.body)

  raw = '{"model":"m"}'
  r = norm(raw, PASS)
  t.equal(r.body, '{"model":"m","stream":true}')

  for (const empty of ['{}', '{ }', ' {\n\n} \n']) {
    r = norm(empty)
    check(t, empty, FORCE_M1, r.body)
    t.equal(r.body.replace(/"keep_alive":-1,"stream":true/, ''), empty, 'no comma in an empty object')
    r = norm(empty, PASS)
    t.equal(r.body.replace(/"stream":true/, ''), empty)
  }

  raw = '{"model":"m","stream":null}'
  r = norm(raw)
  t.equal(r.body, '{"model":"m","stream":true,"keep_alive":-1}')
  raw = '{"stream" :  null  ,"model":"m"}'
  r = norm(raw, PASS)
  t.equal(r.body, '{"stream" :  true  ,"model":"m"}')
  raw = '{"stream":null}  '
  r = norm(raw, PASS)
  t.equal(r.body, '{"stream":true}  ')
})

t.test('unicode, escaped keys, numbers preserved byte-for-byte', async t => {
  const raw = '{"model":"llama3:8b","prompt":"h\\u00e9llo 😀 \\ud83d\\ude00 ünï","options":{"seed":123456789012345678901234,"temperature":1.0,"top_k":1e2,"x":-0.0E-0},' +
    '"k\\u0065ep_alive":"1h","\\"stream\\"":null,"ctx":[18446744073709551615,1.50]}'
  const r = norm(raw)
  t.equal(r.changed, true)
  t.equal(r.body, raw.replace('"k\\u0065ep_alive":"1h"', '"k\\u0065ep_alive":-1').replace(/}$/, ',"stream":true}'))
  // The output minus the changed members equals the input minus them.
  const strip = (s: string) => s.replace(/,"k\\u0065ep_alive":[^,]*/, '').replace(',"stream":true}', '}')
  t.equal(strip(r.body), strip(raw))
  t.ok(r.body.includes('123456789012345678901234'))
  t.ok(r.body.includes('"temperature":1.0'))
  t.ok(r.body.includes('"top_k":1e2'))
  check(t, raw, FORCE_M1, r.body)
})

t.test('unchanged body is the very same string', async t => {
  const raw = '{"model":"m","keep_alive":-1,"stream":false}'
  const r = norm(raw)
  t.equal(r.changed, false)
  t.equal(r.body, raw)
})

t.test('non-object parsed value is rejected', async t => {
  t.throws(() => normalizeOllamaBody('[]', [] as unknown as Record<string, unknown>, FORCE_M1))
  t.throws(() => normalizeOllamaBody('null', null as unknown as Record<string, unknown>, FORCE_M1))
})

// ---------------------------------------------------------------------------------------------
// Property-based: random raw JSON texts, with random whitespace, escapes and number formats.

function mulberry32 (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = a
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

class Gen {
  constructor (readonly rnd: () => number) {}
  int (n: number): number { return Math.floor(this.rnd() * n) }
  pick<T> (xs: readonly T[]): T { return xs[this.int(xs.length)] as T }
  chance (p: number): boolean { return this.rnd() < p }

  ws (): string {
    if (this.chance(0.6)) return ''
    let s = ''
    const n = 1 + this.int(3)
    for (let i = 0; i < n; i++) s += this.pick([' ', '\t', '\n', '\r', '  '])
    return s
  }

  /** A JSON string literal for `text`, with random (but valid) escaping. */
  encodeString (text: string): string {
    let out = '"'
    for (const ch of text) {
      const code = ch.codePointAt(0) as number
      if (ch === '"') out += this.chance(0.8) ? '\\"' : '\\u0022'
      else if (ch === '\\') out += this.chance(0.8) ? '\\\\' : '\\u005C'
      else if (code < 0x20) {
        const short: Record<string, string> = { '\n': '\\n', '\t': '\\t', '\r': '\\r', '\b': '\\b', '\f': '\\f' }
        out += short[ch] !== undefined && this.chance(0.7) ? short[ch] : '\\u' + code.toString(16).padStart(4, '0')
      } else if (this.chance(0.1)) {
        // \u escape (upper- or lower-case hex), surrogate pairs for astral characters
        for (let i = 0; i < ch.length; i++) {
          const hex = ch.charCodeAt(i).toString(16).padStart(4, '0')
          out += '\\u' + (this.chance(0.5) ? hex.toUpperCase() : hex)
        }
      } else if (ch === '/' && this.chance(0.5)) out += '\\/'
      else out += ch
    }
    return out + '"'
  }

  text (): string {
    const pieces = ['a', 'Z', ' ', '"', '\\', '\\"', '{', '}', '[', ']', ',', ':', '/', '\n', '\t', '\u0000', '\u001f',
      'é', '😀', '中', 'keep_alive', 'stream', '"keep_alive": 5', '\\"stream\\": null', 'null', '-1']
    let s = ''
    const n = this.int(6)
    for (let i = 0; i < n; i++) s += this.pick(pieces)
    return s
  }

  key (depth: number): string {
    const keys = depth === 0
      ? ['model', 'prompt', 'options', 'messages', 'images', 'format', 'x', '', 'keep_alivE', 'streams', ' stream', 'keep-alive', '"', '\\']
      : ['model', 'keep_alive', 'stream', 'a', '', 'keep_alive', 'stream', '"stream"', '\\', 'é']
    return this.chance(0.15) ? this.text() : this.pick(keys)
  }

  number (): string {
    return this.pick(['0', '-0', '1', '-1', '1.0', '1.50', '1e2', '1E+2', '-2.5e-3', '12345678901234567890',
      '123456789012345678901234567890', '9007199254740993', '0.1', String(this.int(1e6)), '-0.0E-0'])
  }

  value (depth: number): string {
    const r = this.rnd()
    if (depth > 3 || r < 0.45) {
      return this.pick([
        () => this.number(), () => this.encodeString(this.text()), () => 'true', () => 'false', () => 'null'
      ])()
    }
    if (r < 0.75) return this.object(depth + 1)
    const n = this.int(4)
    if (n === 0) return '[' + this.ws() + ']'
    const items: string[] = []
    for (let i = 0; i < n; i++) items.push(this.ws() + this.value(depth + 1) + this.ws())
    return '[' + items.join(',') + ']'
  }

  object (depth: number): string {
    const n = this.int(4)
    if (n === 0) return '{' + this.ws() + '}'
    const members: string[] = []
    for (let i = 0; i < n; i++) {
      members.push(this.ws() + this.encodeString(this.key(depth)) + this.ws() + ':' + this.ws() + this.value(depth) + this.ws())
    }
    return '{' + members.join(',') + '}'
  }
}

interface Member { kind: 'other' | 'keep_alive' | 'stream', lead: string, value: string, trail: string }

/** A random top-level object; the generator keeps every member's pieces so the expected output can be rebuilt byte for byte. */
function genTopLevel (g: Gen): { raw: string, members: Member[], pre: string, inner: string, post: string } {
  const members: Member[] = []
  const n = g.int(6)
  for (let i = 0; i < n; i++) {
    const r = g.rnd()
    let kind: Member['kind'] = 'other'
    let key: string
    if (r < 0.2) {
      kind = 'keep_alive'
      key = 'keep_alive'
    } else if (r < 0.4) {
      kind = 'stream'
      key = 'stream'
    } else {
      key = g.key(0)
      // A random key may happen to be one of the two (text() has them as pieces).
      if (key === 'keep_alive' || key === 'stream') kind = key
    }
    let value: string
    if (kind === 'keep_alive') {
      value = g.chance(0.5) ? g.pick(['-1', '-1.0', '300', '"5m"', '"-1"', 'null', '0', '"1h30m"']) : g.value(1)
    } else if (kind === 'stream') {
      value = g.pick(['null', 'null', 'true', 'false', '0', '"x"', '{}', '[null]'])
    } else {
      value = g.value(1)
    }
    members.push({ kind, lead: g.ws() + g.encodeString(key) + g.ws() + ':' + g.ws(), value, trail: g.ws() })
  }
  const pre = g.ws()
  const inner = members.length === 0 ? g.ws() : ''
  const post = g.ws()
  const raw = pre + '{' + inner + members.map(m => m.lead + m.value + m.trail).join(',') + '}' + post
  return { raw, members, pre, inner, post }
}

t.test('property: random bodies', async t => {
  const seed = Number(process.env.NORMALIZER_SEED ?? Date.now() % 1e9)
  t.comment(`seed ${seed}`)
  const g = new Gen(mulberry32(seed))
  const modes: KeepAlive[] = [FORCE_M1, FORCE_5M, PASS, { mode: 'force', json: '300' }, { mode: 'force', json: '"a\\"b"' }]
  let failures = 0
  let changedCount = 0

  for (let iter = 0; iter < 500 && failures < 5; iter++) {
    const { raw, members, pre, inner, post } = genTopLevel(g)
    const keepAlive = g.pick(modes)
    const parsed = JSON.parse(raw) as Record<string, unknown>
    const want = expected(raw, keepAlive)
    const { body, changed } = normalizeOllamaBody(raw, parsed, keepAlive)
    const label = `seed ${seed} iter ${iter} ${JSON.stringify(keepAlive)}\nraw:  ${JSON.stringify(raw)}\nout:  ${JSON.stringify(body)}`

    // Only failures are reported (500 iterations of passing asserts would drown the output).
    let ok = true
    let got: unknown
    try {
      got = JSON.parse(body)
    } catch (err) {
      t.fail('output is not JSON: ' + label, { error: err })
      ok = false
    }
    if (ok && !isDeepStrictEqual(got, want)) {
      t.strictSame(got, want, label)
      ok = false
    }

    // Byte-level: the output is the input with the replaced member values, plus at most an
    // insertion placed after the last member (just before the closing brace's whitespace).
    const fixKA = keepAlive.mode === 'force' &&
      (!Object.hasOwn(parsed, 'keep_alive') || parsed.keep_alive !== JSON.parse(keepAlive.json))
    const fixStream = !Object.hasOwn(parsed, 'stream') || parsed.stream === null
    const replaced = pre + '{' + inner + members.map(m => {
      let v = m.value
      if (m.kind === 'keep_alive' && fixKA && keepAlive.mode === 'force') v = keepAlive.json
      if (m.kind === 'stream' && fixStream) v = 'true'
      return m.lead + v + m.trail
    }).join(',') + '}' + post
    const needsInsert = (fixKA && !Object.hasOwn(parsed, 'keep_alive')) || !Object.hasOwn(parsed, 'stream')

    if (!fixKA && !fixStream) {
      if (changed || body !== raw) {
        t.fail('should be unchanged: ' + label)
        ok = false
      }
    } else if (!needsInsert) {
      if (!changed || body !== replaced) {
        t.equal(body, replaced, 'should be replaced in place: ' + label)
        ok = false
      }
    } else {
      let found = false
      if (changed && body.length > replaced.length) {
        const extra = body.length - replaced.length
        let cp = 0
        while (cp < replaced.length && body[cp] === replaced[cp]) cp++
        for (let p = cp; p >= 0 && !found; p--) {
          if (body.endsWith(replaced.slice(p)) && /^\s*\}\s*$/.test(replaced.slice(p))) {
            const ins = body.slice(p, p + extra)
            found = members.length === 0 ? ins.startsWith('"') : ins.startsWith(',"')
          }
        }
      }
      if (!found) {
        t.fail('should only insert after the last member: ' + label)
        ok = false
      }
    }
    if (changed) changedCount++
    if (!ok) failures++
  }
  t.equal(failures, 0, 'no failing random body')
  t.ok(changedCount > 50, 'a good share of bodies needed changes')
})
