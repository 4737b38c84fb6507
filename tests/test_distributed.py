"""Two processes joined by jax.distributed on a localhost coordinator: train, preempt, resume.

Each process is a real `launch.py --distributed` with one CPU device, so the run has a
global mesh of 2 devices over 2 processes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ['--config.data.synthetic.num_subjects=6', '--config.data.synthetic.sequences_per_subject=8',
        '--config.data.synthetic.min_length=20', '--config.data.synthetic.max_length=40',
        '--config.data.num_folds=3', '--config.data.window=16', '--config.data.train_stride=8',
        '--config.model.hidden_dim=16', '--config.model.encoder_layers=1',
        '--config.model.decoder_layers=1', '--config.model.num_heads=2',
        '--config.batch_size=8', '--config.eval_batch_size=16', '--config.num_train_steps=400',
        '--config.log_every_steps=2', '--config.eval_every_steps=1000',
        '--config.checkpoint_every_steps=1000', '--config.optim.warmup_steps=5',
        '--config.num_epochs=1000']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, process_id, port):
  command = [sys.executable, 'launch.py', '--config=configs/phase1.py', *TINY,
             f'--workdir={workdir}', '--distributed', f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2', f'--process_id={process_id}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  log = open(os.path.join(os.path.dirname(workdir), f'process_{process_id}.log'), 'a')
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def wait_for(path, text, processes, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(path, encoding='utf-8', errors='replace') as f:
      if text in f.read():
        return
    if any(p.poll() is not None for p in processes):
      break
    time.sleep(0.2)
  raise AssertionError(f'{text!r} never appeared in {path}:\n' + open(path).read()[-3000:])


def finish(processes, logs, timeout=300):
  codes = []
  for process, log in zip(processes, logs):
    try:
      codes.append(process.wait(timeout=timeout))
    finally:
      if process.poll() is None:
        process.kill()
      log.close()
  return codes


def test_two_processes_train_preempt_and_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'process_{i}.log') for i in range(2)]
  port = free_port()
  started = [start(workdir, i, port) for i in range(2)]
  processes, files = [p for p, _ in started], [f for _, f in started]
  try:
    wait_for(logs[0], 'step 10/400', processes)
    # A preemption notice reaches one host, and JAX's preemption service makes both save the
    # same step and stop.
    processes[1].send_signal(signal.SIGTERM)
    codes = finish(processes, files)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  text = [open(path, encoding='utf-8', errors='replace').read() for path in logs]
  assert codes == [128 + signal.SIGTERM] * 2, text[0][-3000:] + text[1][-3000:]
  assert 'Process 0 of 2' in text[0]
  assert 'Process 1 of 2' in text[1]
  # Each process windows only its own half of the training sequences.
  shares = [re.search(r'train (\d+) \(of (\d+), in process (\d) of 2\)', t).groups()
            for t in text]
  assert [int(share[2]) for share in shares] == [0, 1]
  assert int(shares[0][0]) + int(shares[1][0]) == int(shares[0][1]) == int(shares[1][1])
  assert all(0 < int(share[0]) < int(share[1]) for share in shares)
  stopped = [int(line.split('after step ')[1].split()[0]) for t in text
             for line in t.splitlines() if 'training stopped after step' in line]
  assert len(stopped) == 2, stopped
  assert stopped[0] == stopped[1], stopped
  assert stopped[0] < 400, stopped
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert saved == [stopped[0]]

  port = free_port()
  started = [start(workdir, i, port) for i in range(2)]
  codes = finish([p for p, _ in started], [f for _, f in started], timeout=600)
  text = [open(path, encoding='utf-8', errors='replace').read() for path in logs]
  assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
  assert all(f'Resumed from step {stopped[0]} of 400' in t for t in text)
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == 400
  # Only process 0 writes summaries: each step's record appears once.
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert len(train_steps) == len(set(train_steps))
  assert train_steps[-1] == 400
  events = [n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]
  assert len(events) <= 2  # One file per launch of process 0, none from process 1.
  assert os.path.exists(os.path.join(workdir, 'eval_report.json'))
