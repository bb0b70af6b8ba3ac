//! A resolver playing DNS for reqwest: each name answers its script in turn.

use std::net::SocketAddr;
use std::sync::Mutex;

/// A resolver playing DNS: each name answers its script in turn, the last answer from then on.
#[derive(Debug, Default)]
pub struct ScriptedNames {
    answers: Mutex<std::collections::HashMap<String, Vec<Vec<std::net::IpAddr>>>>,
    pub lookups: Mutex<Vec<String>>,
}

impl ScriptedNames {
    pub fn answer(self, name: &str, script: &[&[&str]]) -> Self {
        let script = script
            .iter()
            .map(|ips| ips.iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        self.answers
            .lock()
            .unwrap()
            .insert(name.to_string(), script);
        self
    }
}

impl reqwest::dns::Resolve for ScriptedNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.lookups.lock().unwrap().push(name.as_str().to_string());
        let answer: Option<Vec<std::net::IpAddr>> = {
            let mut answers = self.answers.lock().unwrap();
            answers.get_mut(name.as_str()).map(|script| {
                if script.len() > 1 {
                    script.remove(0)
                } else {
                    script[0].clone()
                }
            })
        };
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = answer.ok_or_else(|| format!("no such name: {host}"))?;
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
