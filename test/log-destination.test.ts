// The standalone server's log destination (services/config/log-destination.ts): every line comes
// out once and in order, in batches, through a real pipe (a child process reading it), however the
// writes are cut; lines written right before exit come out too (flushSync).
import t from 'tap'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const here = fileURLToPath(new URL('.', import.meta.url))

/** Runs `code` in a child that imports BatchedLog (fd 1 is a pipe to this process); its stdout. */
async function childOutput (code: string): Promise<string> {
  const source = `import { BatchedLog, asyncStdout } from ${JSON.stringify(here + '../services/config/log-destination.ts')}\n${code}`
  const child = spawn(process.execPath, ['--import=tsx', '--input-type=module', '-e', source], { stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.setEncoding('utf8')
  child.stdout.on('data', (chunk: string) => { out += chunk })
  const code2 = await new Promise<number | null>((resolve) => child.once('close', resolve))
  t.equal(code2, 0, 'the child exited cleanly')
  return out
}

t.test('many lines, some longer than a batch, come out once each and in order', async (t) => {
  const out = await childOutput(`
    const log = asyncStdout()
    let i = 0
    const big = 'x'.repeat(20000)
    const tick = () => {
      for (let k = 0; k < 500 && i < 20000; k++, i++) log.write(JSON.stringify({ i, pad: i % 1000 === 0 ? big : 'é' }) + '\\n')
      if (i < 20000) setImmediate(tick)
    }
    tick()
  `)
  const lines = out.trimEnd().split('\n').map((l) => JSON.parse(l) as { i: number })
  t.equal(lines.length, 20000, 'every line')
  t.ok(lines.every((l, k) => l.i === k), 'in order, none twice')
})

t.test('lines written just before exit come out (flushSync)', async (t) => {
  const out = await childOutput(`
    const log = asyncStdout()
    for (let i = 0; i < 100; i++) log.write('line ' + i + '\\n')
    process.exit(0)
  `)
  t.equal(out.trimEnd().split('\n').length, 100)
  t.match(out, /line 99\n$/)
})

t.test('a batch is written without a flush once it is large enough, and by the timer otherwise', async (t) => {
  const out = await childOutput(`
    const log = new BatchedLog(1)
    log.write('a'.repeat(9000) + '\\n')
    log.write('small\\n')
    setTimeout(() => { log.flush() }, 50)
    setTimeout(() => {}, 200)
  `)
  t.equal(out, 'a'.repeat(9000) + '\nsmall\n')
})
