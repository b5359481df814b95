// Request bodies held in memory (issue 15): BODY_MEMORY_LIMIT bounds the bytes of waiting and
// in-flight requests' bodies, a waiting request keeps one copy, and every body's bytes are given
// back once when its request ends. Both tests fail on the tree before the fix.
import t, { type Test } from 'tap'
import net from 'node:net'
import { spawn } from 'node:child_process'
import { mkdtemp, rm, readFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import { embeddedEnv, startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator, type Simulator } from './helpers/upstream-simulator.js'
import { SERVER, TS_LOADER } from './helpers/ts-loader.js'

async function post (url: string, body: string | Buffer): Promise<{ status: number, headers: Headers }> {
  const res = await fetch(url, { method: 'POST', body: body as BodyInit })
  await res.text()
  return { status: res.status, headers: res.headers }
}

async function simulator (t: Test, options: Parameters<typeof startSimulator>[0] = {}): Promise<Simulator> {
  const sim = await startSimulator(options)
  t.teardown(() => sim.close())
  return sim
}

const metricLine = (text: string, name: string): number => {
  const line = text.split('\n').find((l) => l.startsWith(name + ' ') || l.startsWith(name + '{'))
  return line == null ? NaN : Number(line.slice(line.lastIndexOf(' ') + 1))
}

/* ------------------------------------------------------------------------------------------ */

const HEAP_PROBE = fileURLToPath(new URL('./helpers/heap-peak.mjs', import.meta.url))

/** The standalone server in its own process (its heap measured apart from the test's), embedded mode. */
async function spawnServer (t: Test, env: Record<string, string>, nodeOptions: string[]): Promise<{ url: string, alive: () => boolean, peakFile: string, signal: (name: NodeJS.Signals) => void }> {
  const dir = await mkdtemp(join(tmpdir(), 'maestro-heap-'))
  t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })
  const peakFile = join(dir, 'peak')
  const clean = embeddedEnv()
  delete clean.NODE_OPTIONS
  const child = spawn(process.execPath, [...nodeOptions, ...TS_LOADER, `--import=${HEAP_PROBE}`, SERVER], {
    cwd: dir,
    env: { ...clean, ...env, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', HEAP_PEAK_FILE: peakFile },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  t.teardown(async () => { if (child.exitCode == null && child.signalCode == null) child.kill('SIGKILL'); await exited })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
  const url = await new Promise<string>((resolve, reject) => {
    let out = ''
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(out)
      if (m != null) resolve(m[1])
    })
    child.once('exit', (code) => reject(new Error(`server exited (${String(code)}): ${stderr}`)))
  })
  return { url, alive: () => child.exitCode == null && child.signalCode == null, peakFile, signal: (name) => child.kill(name) }
}

interface HeapPeak { peak: number, live: number, majorGcs: number, limit: number, forced: number, forcedCount: number }
const readPeak = async (file: string): Promise<HeapPeak> => JSON.parse(await readFile(file, 'utf8')) as HeapPeak

t.test('twelve 40 MB bodies behind a busy GPU: each answered 200 or 503, the process alive, its heap within the budget', async (t) => {
  const MB = 1024 * 1024
  const budget = 100 * MB
  // The request that holds the only GPU streams for as long as the test lets it (1000 x 100 ms).
  const sim = await simulator(t, { models: ['m'], tokens: 1000, tokenDelayMs: 100 })
  const file = await writeInventoryFile(t, [{ name: 'only', model: '*', port: sim.port, gpus: [1] }])
  // A small heap: the twelve bodies (480 MB) do not fit in it even once each, so without the
  // budget the process dies of them (the issue saw a 768 MB heap die of three copies each).
  const heapMb = 256
  const t0 = performance.now()
  const gw = await spawnServer(t, { INVENTORY_FILE: file, BODY_MEMORY_LIMIT: String(budget) }, [`--max-old-space-size=${heapMb}`, '--expose-gc'])
  t.comment(`server up in ${(performance.now() - t0).toFixed(0)} ms`)
  const heldBytes = async (): Promise<number> => metricLine(await (await fetch(gw.url + '/metrics')).text(), 'maestro_body_memory_bytes')
  /** The heap used right after a full collection in the server (SIGWINCH to its probe). */
  const liveHeap = async (): Promise<number> => {
    const before = (await readPeak(gw.peakFile)).forcedCount
    gw.signal('SIGWINCH')
    for (let i = 0; i < 200; i++) {
      await sleep(25)
      const now = await readPeak(gw.peakFile).catch(() => undefined)
      if (now != null && now.forcedCount > before) return now.forced
    }
    throw new Error('the server did not measure its heap')
  }
  const baseline = await liveHeap()

  const holder = new AbortController()
  const slowRes = await fetch(gw.url + '/api/generate', { method: 'POST', body: '{"model":"m","prompt":"hold the GPU"}', signal: holder.signal })
  const slowDone = slowRes.text().catch(() => 'aborted')
  const prefix = '{"model":"m","stream":false,"options":{"num_predict":1},"prompt":"'
  const big = Buffer.alloc(40 * MB, 'a')
  big.write(prefix, 0)
  big.write('"}', big.length - 2)
  let settled = 0
  const burst = Array.from({ length: 12 }, async () => {
    try {
      const res = await fetch(gw.url + '/api/generate', { method: 'POST', body: big as BodyInit })
      const text = await res.text()
      return { status: res.status, retryAfter: res.headers.get('retry-after'), text: text.slice(0, 200) }
    } catch (err) {
      return { status: 0, retryAfter: null, text: String((err as Error).cause ?? err) }
    } finally {
      settled++
    }
  })
  // Every burst request either refused or read whole and waiting for the GPU.
  const waitingForGpu = async (): Promise<number> => await fetch(gw.url + '/health').then(async (r) => Number(((await r.json()) as { leases?: { waiting?: number } }).leases?.waiting), () => NaN)
  let waiting = 0
  for (const deadline = performance.now() + 60_000; performance.now() < deadline && gw.alive(); await sleep(100)) {
    waiting = await waitingForGpu()
    if (settled + waiting >= 12) break
  }
  if (!gw.alive()) {
    t.fail(`the server died during the burst (${settled} answered)`)
    return
  }
  const held = await heldBytes()
  t.comment(`burst in at ${(performance.now() - t0).toFixed(0)} ms: ${settled} answered, ${waiting} waiting, ${(held / MB).toFixed(1)} MB held`)
  t.ok(waiting >= 1 && settled + waiting === 12 && held <= budget, `requests wait with their bodies (${waiting}), within the budget`)
  // What the process keeps while they wait: one copy of each waiting body (not its text, parsed
  // object and forwarded copy), over the resting heap.
  const live = await liveHeap()
  t.comment(`heap after a full collection: ${(baseline / MB).toFixed(0)} MB at rest, ${(live / MB).toFixed(0)} MB with ${waiting} bodies of 40 MB waiting`)
  t.ok(live - baseline < held + 16 * MB, `live heap growth ${((live - baseline) / MB).toFixed(0)} MB: one copy of the ${(held / MB).toFixed(0)} MB held`)
  holder.abort()
  await slowDone
  const answers = await Promise.all(burst)
  t.comment(`burst answered at ${(performance.now() - t0).toFixed(0)} ms`)
  t.equal(slowRes.status, 200, 'the request holding the GPU was served')
  const statuses = answers.map((a) => a.status)
  t.comment(`statuses: ${statuses.join(' ')}`)
  t.ok(statuses.every((s) => s === 200 || s === 503), 'every burst request answered 200 or 503')
  t.equal(statuses.filter((s) => s === 200).length, waiting, 'the waiting ones were served')
  t.ok(statuses.includes(503), 'some were refused for lack of body memory')
  for (const a of answers.filter((a) => a.status === 503)) {
    t.match(a.retryAfter, /^\d+$/, '503 with Retry-After')
    t.match(a.text, /BODY_MEMORY_LIMIT/)
  }
  t.ok(gw.alive(), 'the process is alive')
  const heap = await readPeak(gw.peakFile)
  t.comment(`heap: peak ${(heap.peak / MB).toFixed(0)} MB with garbage, ${(heap.live / MB).toFixed(0)} MB at most after a full collection ` +
    `(${heap.majorGcs}), limit ${(heap.limit / MB).toFixed(0)} MB, budget ${budget / MB} MB`)
  // Parsing a body makes short-lived copies (the text as it arrives, the parsed object) on top of
  // the ones held: the most the process ever kept is the budget plus one body being parsed.
  t.ok(heap.live - baseline < budget + 2 * 40 * MB, `live heap growth at most ${((heap.live - baseline) / MB).toFixed(0)} MB: the ${budget / MB} MB budget and one body being parsed`)

  const metrics = await (await fetch(gw.url + '/metrics')).text()
  t.equal(metricLine(metrics, 'maestro_body_memory_bytes'), 0, 'every body released once its request ended')
  t.equal((await post(gw.url + '/api/generate', big)).status, 200, 'and a 40 MB body is taken again')
  t.equal(metricLine(await (await fetch(gw.url + '/metrics')).text(), 'maestro_body_memory_bytes'), 0, 'released again')
})

t.test('a chunked body is counted as it arrives, and a request cut off midway gives its bytes back', async (t) => {
  const sim = await simulator(t, { models: ['m'] })
  const file = await writeInventoryFile(t, [{ name: 'only', model: '*', port: sim.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, BODY_MEMORY_LIMIT: 100_000 })
  const held = async (): Promise<number> => metricLine(await (await fetch(gw.url + '/metrics')).text(), 'maestro_body_memory_bytes')
  const { port } = new URL(gw.url)
  // A chunked body that stops halfway and then the client leaves.
  const socket = net.connect(Number(port), '127.0.0.1')
  socket.write('POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n')
  const chunk = '{"model":"m","prompt":"' + 'y'.repeat(60_000)
  socket.write(`${chunk.length.toString(16)}\r\n${chunk}\r\n`)
  await sleep(200)
  t.equal(await held(), chunk.length, 'the bytes received so far are held')
  const refused = await post(gw.url + '/api/generate', JSON.stringify({ model: 'm', prompt: 'z'.repeat(50_000), stream: false }))
  t.equal(refused.status, 503, 'a body that would pass the budget is refused')
  t.ok(Number(refused.headers.get('retry-after')) > 0, 'with Retry-After')
  socket.destroy()
  await sleep(200)
  t.equal(await held(), 0, 'the cut-off request gave its bytes back')
  t.equal((await post(gw.url + '/api/generate', JSON.stringify({ model: 'm', prompt: 'z'.repeat(50_000), stream: false }))).status, 200)
  t.equal(await held(), 0)
})

