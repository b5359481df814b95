// The standalone server's log lines are written asynchronously, in batches (issue 13): none may be
// lost on SIGTERM, and on SIGKILL only what was logged in the last flush interval.
import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { tmpdir } from 'node:os'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { startSimulator } from './helpers/upstream-simulator.js'
import { embeddedEnv, writeInventoryFile } from './helpers/embedded.js'
import { LOG_FLUSH_MS } from '../services/config/log-destination.js'
import { SERVER, TS_LOADER } from './helpers/ts-loader.js'

const REQUESTS = 40

/** The server in embedded mode (`server.ts` through the tests' loader), stdout a pipe (as under a container runtime). */
async function server (t: Test, inventory: string) {
  const env = embeddedEnv({ INVENTORY_FILE: inventory, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', NODE_ENV: '' })
  delete env.NODE_OPTIONS
  const proc = spawn(process.execPath, [...TS_LOADER, SERVER], { cwd: tmpdir(), env, stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  t.teardown(async () => { if (proc.exitCode == null && proc.signalCode == null) proc.kill('SIGKILL'); await exited })
  let out = ''
  proc.stdout.on('data', (d: Buffer) => { out += d.toString() })
  const lines = (): any[] => out.split('\n').filter(Boolean).map((l) => JSON.parse(l))
  const deadline = performance.now() + 20_000
  let url: string | undefined
  while (url === undefined) {
    url = lines().map((l) => /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(String(l.msg))?.[1]).find(Boolean)
    if (proc.exitCode != null) throw new Error('the server exited at start')
    if (performance.now() > deadline) throw new Error('the server did not start within 20 s')
    await sleep(20)
  }
  return { url, proc, exited, finished: () => lines().filter((l) => l.msg === 'request finished') }
}

async function generateAll (url: string): Promise<void> {
  const answers = await Promise.all(Array.from({ length: REQUESTS }, async (_, i) => {
    const res = await fetch(`${url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'm', prompt: `p${i}`, stream: false }) })
    await res.text()
    return res.status
  }))
  if (answers.some((s) => s !== 200)) throw new Error(`answers: ${answers.join(',')}`)
}

t.test('SIGTERM right after a burst: every request has its line', async (t) => {
  const sim = await startSimulator({ models: ['m'], tokens: 1, tokenDelayMs: 0 })
  t.teardown(() => sim.close())
  const gw = await server(t, await writeInventoryFile(t, [{ name: 'sim', model: 'm', port: sim.port, gpus: [1] }]))
  await generateAll(gw.url)
  gw.proc.kill('SIGTERM')
  await gw.exited
  t.equal(gw.proc.exitCode, 0, 'clean exit')
  t.equal(gw.finished().length, REQUESTS, `${REQUESTS} requests, ${REQUESTS} lines, none lost in the buffer`)
})

t.test(`SIGKILL: lines older than the flush interval (${LOG_FLUSH_MS} ms) are out`, async (t) => {
  const sim = await startSimulator({ models: ['m'], tokens: 1, tokenDelayMs: 0 })
  t.teardown(() => sim.close())
  const gw = await server(t, await writeInventoryFile(t, [{ name: 'sim', model: 'm', port: sim.port, gpus: [1] }]))
  await generateAll(gw.url)
  // a few flush intervals, generous for a loaded 2-core machine; the buffer holds 8 KiB, more
  // than these 40 lines, so without the timed flush they would still be in it
  await sleep(LOG_FLUSH_MS * 6)
  gw.proc.kill('SIGKILL')
  await gw.exited
  t.equal(gw.finished().length, REQUESTS, 'every line logged before the last flush interval reached stdout')
})
